"""A JSONL trace in the Chrome/Perfetto trace-event format (``loadfsm trace --perfetto``).

Open the file at https://ui.perfetto.dev or chrome://tracing. One track (thread) per layer
with a slice per state; slices of a push's reload are named ``reload <STATE>`` and the
state a rollback returns to ``FINALIZED (rolled back)``; counters for the ledger's memory
and the floor; instant events for failures, defaults, padding, ties and warnings.
Times are the trace's own clock (seconds since the session began), in microseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from .trace_timeline import Span, Timeline, floor_bytes, read_events, timeline

PID = 1
# Chrome's reserved colour names (``cname``); Perfetto colours by name instead.
_COLOURS = {"META": "grey", "PARTIAL": "thread_state_iowait", "COMPLETE": "yellow",
            "QUANTIZED": "thread_state_runnable", "FINALIZED": "good"}
_INSTANTS = {"layer_defaulted": "defaults", "layer_padded": "padding",
             "tied_weight": "tied weight", "fp8_underflow": "fp8 underflow",
             "layers_in_flight": "layers in flight", "load_incomplete": "load incomplete",
             "unexpected_weights": "unexpected weights", "load_failed": "load failed",
             "push_failed": "push failed", "push_rolled_back": "push rolled back"}
_BAD = {"load_failed", "push_failed", "push_rolled_back", "load_incomplete",
        "unexpected_weights", "fp8_underflow"}


def _us(t: float) -> float:
    return round(t * 1e6, 3)


def slice_name(span: Span) -> str:
    if span.rolled_back:
        return "FINALIZED (rolled back)"
    return f"reload {span.state}" if span.reload else span.state


def trace_events(events: list[dict]) -> dict:
    """The trace-event JSON object (``{"traceEvents": [...]}``) of one trace's events."""
    tl = timeline(events)
    tids = {layer: i + 1 for i, layer in enumerate(tl.spans)}
    out = [{"ph": "M", "pid": PID, "name": "process_name", "args": {"name": "loadfsm"}}]
    for layer, tid in tids.items():
        out.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name",
                    "args": {"name": layer}})
        out.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index",
                    "args": {"sort_index": tid}})
        for span in tl.spans[layer]:
            out.append({"ph": "X", "pid": PID, "tid": tid, "name": slice_name(span),
                        "cat": "reload" if span.reload or span.rolled_back else "load",
                        "ts": _us(span.start), "dur": _us(span.end - span.start),
                        "cname": "terrible" if span.rolled_back else _COLOURS[span.state],
                        "args": {"state": span.state, "pieces_arrived": span.pieces}})
    out += _counters(tl)
    for event in events:
        name = _INSTANTS.get(event.get("event"))
        if name is None:
            continue
        # a tie names tensors: its track is the canonical tensor's layer
        tid = tids.get(event.get("layer") or (event.get("canonical") or "").rpartition(".")[0])
        args = {k: v for k, v in event.items() if k not in ("event", "t", "level", "timestamp")}
        instant = {"ph": "i", "pid": PID, "name": name, "ts": _us(event.get("t", tl.end)),
                   "cat": "error" if event["event"] in _BAD else "info", "args": args}
        instant.update({"s": "t", "tid": tid} if tid else {"s": "g", "tid": 0})
        if event["event"] in _BAD:
            instant["cname"] = "terrible"
        out.append(instant)
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def _counters(tl: Timeline) -> list[dict]:
    out = [{"ph": "C", "pid": PID, "name": "ledger memory (bytes)", "ts": _us(t),
            "args": {"staging": s, "final": f, "total": s + f}} for t, s, f in tl.memory]
    floor = floor_bytes(tl)
    if floor is not None:
        out += [{"ph": "C", "pid": PID, "name": "floor: final + largest layer (bytes)",
                 "ts": _us(t), "args": {"floor": floor}} for t in (0.0, tl.end)]
    committed = 0
    for t, n in tl.committed:
        committed += n
        out.append({"ph": "C", "pid": PID, "name": "push: bytes committed", "ts": _us(t),
                    "args": {"committed": committed}})
    return out


def write_perfetto(trace: str | Path, out: str | Path) -> dict:
    """Convert the JSONL ``trace`` to a trace-event file at ``out``; returns the object."""
    data = trace_events(read_events(trace))
    Path(out).write_text(json.dumps(data), encoding="utf-8")
    return data
