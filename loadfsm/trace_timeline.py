"""A JSONL trace as a timeline: per layer, the spans it spent in each state, and the
ledger's memory over time. Shared by the Perfetto export and the plot."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

# The events that end a load or a push; a trace whose last transition has none after it
# was cut short.
ENDS = ("load_complete", "push_complete", "load_failed", "push_failed")


def read_events(path: str | Path) -> list[dict]:
    """The events of a JSONL trace, in order (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


@dataclass
class Span:
    """A layer's stay in one state, ``start``..``end`` in trace seconds."""

    state: str
    start: float
    end: float
    reload: bool = False         # inside a push: the layer was reloaded and not yet back
    rolled_back: bool = False    # the FINALIZED span a rollback returned to
    pieces: int = 0              # pieces that arrived during the span


@dataclass
class Timeline:
    spans: dict[str, list[Span]] = field(default_factory=dict)   # layer -> spans, in order
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # (t, staging, final)
    committed: list[tuple[float, int]] = field(default_factory=list)    # (t, bytes) of commits
    rollbacks: list[float] = field(default_factory=list)           # t of each rolled-back push
    end: float = 0.0
    totals: dict = field(default_factory=dict)                     # the load_complete event


def timeline(events: list[dict]) -> Timeline:
    """Cut each layer's transitions into state spans; the last span runs to the trace's end."""
    tl = Timeline()
    open_: dict[str, Span] = {}
    for event in events:
        t = event.get("t", tl.end)
        tl.end = max(tl.end, t)
        kind = event.get("event")
        if kind == "load_complete":
            tl.totals = event
        elif kind == "push_rolled_back":
            tl.rollbacks.append(t)
        if kind != "layer_transition":
            continue
        layer, trigger = event["layer"], event["trigger"]
        prev = open_.get(layer)
        if "ledger_staging" in event:
            tl.memory.append((t, event["ledger_staging"], event["ledger_final"]))
        if prev is not None and prev.state == event["dst"] == event["src"]:
            prev.pieces += trigger == "arrive"     # PARTIAL -> PARTIAL: one slice
            continue
        if prev is not None:
            prev.end = t
        reload = trigger == "reload" or (prev is not None and prev.reload
                                          and trigger not in ("finalize", "rollback"))
        span = Span(event["dst"], t, t, reload=reload, rolled_back=trigger == "rollback",
                    pieces=int(trigger == "arrive"))
        tl.spans.setdefault(layer, []).append(span)
        open_[layer] = span
        if trigger == "finalize" and prev is not None and prev.reload:
            tl.committed.append((t, event.get("bytes", 0)))
    for span in open_.values():
        span.end = tl.end
    return tl


def floor_bytes(tl: Timeline) -> int | None:
    """final model + largest layer: the most a layer-by-layer load should hold."""
    if tl.totals:
        return tl.totals["final_bytes"] + tl.totals["largest_layer_bytes"]
    if tl.memory:
        return max(f for _, _, f in tl.memory) + max(s for _, s, _ in tl.memory)
    return None


def naive_peak(report) -> int:
    """Peak of load-everything-then-quantize, by the same ledger: the whole
    full-precision model, plus the largest layer's quantized output while its
    full-precision copy is still held (each freed right after; the kindest case).

    ``report`` is a ``LoadReport`` or anything with its ``quant``, ``bytes_read`` and
    ``largest_output_bytes``."""
    if report.quant is None:
        return report.bytes_read
    return report.bytes_read + report.largest_output_bytes


def naive_peak_bytes(tl: Timeline) -> int | None:
    """``naive_peak`` of the trace's ``load_complete`` event (None without one)."""
    if not tl.totals or tl.totals.get("bytes_read") is None:
        return None
    return naive_peak(SimpleNamespace(**tl.totals))
