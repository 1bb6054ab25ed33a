"""Sections that must finish whole: a layer's commit, one push per model.

A Ctrl-C that lands between the weight and the scale copy of an FP8 commit would leave
a layer half new. ``deferred_interrupts`` holds SIGINT until the section ends (Python
runs signal handlers on the main thread only, so other threads need no deferral; an
exception there is undone by the caller). ``model_lock`` is the one push lock of a model,
shared by every ``WeightSync`` on it.
"""

from __future__ import annotations

import _signal
import os
import signal
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

from torch import nn

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_SIGINT = int(signal.SIGINT)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the body with SIGINT held; a SIGINT that arrived is delivered at the end.
    Inside another deferred section it costs nothing: the outer one delivers."""
    # ``_signal``: ``signal``'s C functions, without the enum conversions its wrappers
    # make (10 us a section, and a push commits each layer in one).
    current = _signal.getsignal(_SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or current is None                           # not set from Python
            or isinstance(current, _Held)):              # already held
        yield
        return
    received: list[tuple[int, object]] = []
    previous = _signal.signal(_SIGINT, _Held(received))
    try:
        yield
    finally:
        _signal.signal(_SIGINT, previous)
        if received:
            _deliver(previous, *received[0])


class _Held:
    """The SIGINT handler of a deferred section: notes the signal for the end."""

    def __init__(self, received: list):
        self.received = received

    def __call__(self, signum: int, frame) -> None:
        self.received.append((signum, frame))


def _deliver(handler, signum: int, frame) -> None:
    if callable(handler):
        handler(signum, frame)            # default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def model_lock(model: nn.Module) -> threading.Lock:
    """The push lock of ``model`` (created on first use, gone with the model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock
