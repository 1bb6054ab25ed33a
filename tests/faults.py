"""Faults the reliability tests inject: a source that breaks off, a failing
``Tensor.copy_`` (or a signal in the middle of one), a trace file that fills up."""

from __future__ import annotations

import errno
import io
import signal
from contextlib import contextmanager
from itertools import islice

import torch

import loadfsm.trace


def raising_after(items, n: int, exc: BaseException):
    """Yield the first ``n`` of ``items``, then raise ``exc`` (a trainer or disk going away)."""
    items = iter(items)
    yield from islice(items, n)
    raise exc


class CopyFault:
    """Within the block, the ``at``-th ``Tensor.copy_`` call injects ``kind``:
    ``"sigint"`` (a real SIGINT, delivered where Python next checks for signals),
    ``"keyboard"`` (KeyboardInterrupt raised right there, as off the main thread),
    ``"raise"`` (RuntimeError right there); nothing for another kind. With ``into``
    (a set of ``data_ptr``s), only copies into those tensors are counted."""

    def __init__(self, kind: str, at: int, into=None):
        self.kind, self.at, self.into, self.calls = kind, at, into, 0

    def __enter__(self):
        real = self._real = torch.Tensor.copy_

        def copy_(tensor, src, *args, **kwargs):
            if self.into is not None and tensor.data_ptr() not in self.into:
                return real(tensor, src, *args, **kwargs)
            self.calls += 1
            if self.calls == self.at:
                if self.kind == "sigint":
                    signal.raise_signal(signal.SIGINT)
                elif self.kind == "keyboard":
                    raise KeyboardInterrupt
                elif self.kind == "raise":
                    raise RuntimeError("injected copy failure")
            return real(tensor, src, *args, **kwargs)

        torch.Tensor.copy_ = copy_
        return self

    def __exit__(self, *exc):
        torch.Tensor.copy_ = self._real


class FullDisk(io.StringIO):
    """A trace file whose ``fail_after``-th write fails as a full disk does."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.writes, self.fail_after = 0, fail_after

    def write(self, text):
        self.writes += 1
        if self.writes >= self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


@contextmanager
def full_disk(fail_after: int):
    """Within the block, every trace file loadfsm opens is a ``FullDisk``."""
    loadfsm.trace.open = lambda *args, **kwargs: FullDisk(fail_after)
    try:
        yield
    finally:
        del loadfsm.trace.open
