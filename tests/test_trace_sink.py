"""The JSONL trace sink: transitions held and written in batches, nothing lost at close."""

import json

from structlog.testing import capture_logs

from faults import FullDisk
import loadfsm.trace
from loadfsm.trace import Tracer


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_last_transition_reaches_the_file_at_close(tmp_path):
    """Transitions held for the next batch are written, in order, when the trace closes."""
    path = tmp_path / "t.jsonl"
    tracer = Tracer(path)
    tracer.transition("a", "META", "PARTIAL", "arrive", 8, piece="a.w")
    tracer.transition("a", "PARTIAL", "COMPLETE", "complete", 8)
    tracer.close()
    events = _events(path)
    assert [(e["event"], e["layer"], e["trigger"]) for e in events] == [
        ("layer_transition", "a", "arrive"), ("layer_transition", "a", "complete")]
    assert list(events[0]) == ["event", "level", "layer", "src", "dst", "trigger", "bytes",
                               "piece", "t"]


def test_a_full_disk_at_close_warns_once_and_the_file_is_closed(monkeypatch):
    """The held transitions failing to write at close give one trace_sink_failed warning."""
    disk = FullDisk(1)
    monkeypatch.setattr(loadfsm.trace, "open", lambda *args, **kwargs: disk, raising=False)
    tracer = Tracer("t.jsonl")
    tracer.transition("a", "META", "PARTIAL", "arrive", 8)
    with capture_logs() as logs:
        tracer.close()
    assert [e["event"] for e in logs] == ["trace_sink_failed"]
    assert disk.closed and not tracer.enabled
