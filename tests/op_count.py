"""Work counted, not timed: the Python lines a block executes (each loop iteration counts
again), so a scaling test can assert O(n) with no clock; the count is the same on an idle
machine and a busy one. Loops run inside C (``sorted``, ``sum`` over a dict) and work on
other threads are not seen: ``benchmarks/scaling_bench.py`` times the same cases. And the
torch ops a block dispatches (on a GPU each is a launch or an allocation)."""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

from torch.utils._python_dispatch import TorchDispatchMode


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


@contextmanager
def torch_ops():
    """``with torch_ops() as ops: ...``; then ``ops`` counts the aten ops the block
    dispatched on this thread, by name (views included: each is host work too)."""
    ops: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        yield ops
