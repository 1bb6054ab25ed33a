"""Read a JSONL trace back and say what happened: the ``loadfsm trace`` command.

A trace ends well when its last layer transition is followed by ``load_complete`` or
``push_complete``; a ``load_failed`` / ``push_failed`` event, or a trace that stops
after a transition (a process that crashed), makes ``failed`` true.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .trace_timeline import ENDS, read_events


@dataclass
class TraceSummary:
    final_states: dict[str, int]
    slowest: list[tuple[str, float]]                 # (layer, seconds first event -> FINALIZED)
    not_finalized: dict[str, str]                    # layer -> last state
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    defaulted: dict[str, list[str]] = field(default_factory=dict)
    padded: dict[str, list[str]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    in_flight_warnings: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)      # load_failed / push_failed events
    rolled_back: list[str] = field(default_factory=list)    # layers a push rolled back
    pushes: int = 0                                          # push_complete events
    ended: bool = False          # a complete or failed event follows the last transition

    @property
    def failed(self) -> bool:
        """The load or a push failed, or the trace stops short (a crashed process)."""
        return bool(self.failures) or not self.ended

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_finalized


_FAILURE = ("error", "message", "tensor", "file", "layer", "committed", "t")


def summarize(path: str | Path, top: int = 5) -> TraceSummary:
    """Summarize the events of one trace file (one load)."""
    last: dict[str, str] = {}
    first_t: dict[str, float] = {}
    done_t: dict[str, float] = {}
    summary = TraceSummary({}, [], {})
    for event in read_events(path):
        kind = event.get("event")
        if kind in ENDS:
            summary.ended = True
        if kind == "layer_transition":
            summary.ended = False
            if event["trigger"] == "rollback":
                summary.rolled_back.append(event["layer"])
            layer = event["layer"]
            first_t.setdefault(layer, event["t"])
            last[layer] = event["dst"]
            if event["dst"] == "FINALIZED":
                done_t[layer] = event["t"]
        elif kind == "layer_defaulted":
            summary.defaulted[event["layer"]] = event.get("pieces", [])
        elif kind == "layer_padded":
            summary.padded[event["layer"]] = event.get("tensors", [])
        elif kind == "tied_weight":
            summary.tied[event["alias"]] = event["canonical"]
        elif kind == "layers_in_flight":
            summary.in_flight_warnings.append(event)
        elif kind in ("load_failed", "push_failed"):
            summary.failures.append({"event": kind, **{k: event.get(k) for k in _FAILURE}})
        elif kind == "push_complete":
            summary.pushes += 1
        elif kind == "load_complete":
            summary.missing = event.get("missing", {})
            summary.unexpected = event.get("unexpected", [])
            summary.totals = {k: event.get(k) for k in
                              ("peak_bytes", "final_bytes", "largest_layer_bytes", "seconds",
                               "device", "quant", "bytes_read", "cuda_peak_bytes")}
    for layer in summary.missing:
        last.setdefault(layer, "META")
    summary.final_states = dict(Counter(last.values()))
    summary.not_finalized = {layer: s for layer, s in last.items() if s != "FINALIZED"}
    durations = {layer: done_t[layer] - first_t[layer] for layer in done_t}
    summary.slowest = sorted(durations.items(), key=lambda kv: -kv[1])[:top]
    return summary


def format_summary(s: TraceSummary) -> str:
    lines = ["layers by final state: " +
             ", ".join(f"{k}={v}" for k, v in sorted(s.final_states.items()))]
    for f in s.failures:
        where = ", ".join(f"{k}={f[k]}" for k in ("tensor", "file", "layer")
                          if f.get(k) and str(f[k]) not in f["message"])
        lines.append(f"FAILED ({f['event']}): {f['error']}: {f['message']}"
                     + (f" [{where}]" if where else ""))
        if f.get("committed") is not None:
            lines.append(f"  committed before the failure: {len(f['committed'])} layer(s)"
                         + (f": {', '.join(f['committed'])}" if f["committed"] else ""))
    if s.rolled_back:
        lines.append(f"rolled back (old weights kept): {', '.join(s.rolled_back)}")
    if not s.ended:
        lines.append("FAILED: the trace stops after a layer transition, with no "
                     "load_complete or push_complete (the process died or the trace is cut)")
    if s.pushes:
        lines.append(f"pushes completed: {s.pushes}")
    if s.totals:
        t = s.totals
        lines.append(f"load: {t['seconds']:.3f} s on {t['device']} quant={t['quant']} "
                     f"peak={_mb(t['peak_bytes'])} final={_mb(t['final_bytes'])} "
                     f"largest layer={_mb(t['largest_layer_bytes'])}")
    if s.slowest:
        lines.append("slowest layers:")
        lines += [f"  {layer}: {sec * 1000:.2f} ms" for layer, sec in s.slowest]
    if s.not_finalized:
        lines.append("never FINALIZED:")
        for layer, state in s.not_finalized.items():
            miss = s.missing.get(layer)
            lines.append(f"  {layer} (left {state})" +
                         (f": missing {', '.join(miss)}" if miss else ""))
    if s.unexpected:
        lines.append(f"unexpected tensors: {', '.join(s.unexpected)}")
    for title, table in (("given defaults", s.defaulted), ("padded (zero-filled)", s.padded)):
        if table:
            lines.append(f"{title}:")
            lines += [f"  {layer}: {', '.join(items)}" for layer, items in table.items()]
    if s.tied:
        lines.append("tied: " + ", ".join(f"{a} -> {c}" for a, c in s.tied.items()))
    for warn in s.in_flight_warnings:
        lines.append(f"warning: {warn['count']} layers in flight (limit {warn['limit']}, "
                     f"{warn['staging_mb']} MB staging): {', '.join(warn['layers'])}")
    return "\n".join(lines)


def summary_dict(s: TraceSummary) -> dict:
    return {**asdict(s), "failed": s.failed, "ok": s.ok}


def _mb(n) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"
