"""Work counted, not timed: the Python lines a block executes (each loop iteration counts
again), so a scaling test can assert O(n) with no clock; the count is the same on an idle
machine and a busy one. Loops run inside C (``sorted``, ``sum`` over a dict) and work on
other threads are not seen: ``benchmarks/scaling_bench.py`` times the same cases."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import SimpleNamespace


@contextmanager
def lines_run():
    """``with lines_run() as work: ...``; then ``work.lines`` is how many Python lines (and
    calls) the functions called in the block executed on this thread."""
    work = SimpleNamespace(lines=0)

    def on_line(frame, event, arg):
        work.lines += event == "line"
        return on_line

    def on_call(frame, event, arg):
        work.lines += 1
        return on_line

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield work
    finally:
        sys.settrace(previous)
