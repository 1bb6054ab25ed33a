"""A watchdog for stuck loads and pushes.

When no piece has arrived for ``timeout`` seconds, it warns (structlog, logger
``loadfsm``: ``load_stalled`` or ``push_stalled``) listing the layers in flight and the
exact pieces each still waits for, and warns again after each further ``timeout`` of
silence. A push warns only while one of its layers waits for pieces: before its first
tensor the engine is waiting for the trainer, after its last it is committing, and
neither is a stall; a layer that begins waiting warns once it has waited a whole
``timeout``. A daemon thread polls the session's arrival count, so the load
itself pays one integer increment per piece.

``load(..., watchdog=30)`` and ``WeightReceiver(..., stall_warning_s=...)`` (on by
default) use it; around a local push: ``with Watchdog(sync.session, 30, "push"):``.
"""

from __future__ import annotations

import threading
import time

import structlog

from .states import LayerState

log = structlog.get_logger("loadfsm")
_WAITING = (LayerState.META, LayerState.PARTIAL)


class Watchdog:
    """Context manager: watches ``session`` for ``timeout`` seconds without an arrival.

    Args:
        session: the ``LoadSession`` being fed.
        timeout: seconds of silence before a warning; ``None`` or 0: off (no thread).
        what: ``"load"`` or ``"push"`` (names the event; see the module doc).
    """

    def __init__(self, session, timeout: float | None, what: str = "load"):
        if what not in ("load", "push"):
            raise ValueError(f"what must be 'load' or 'push', got {what!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        self.session, self.timeout, self.what = session, timeout, what
        self.warnings = 0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Watchdog":
        if self.timeout:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, name=f"loadfsm-{self.what}"
                                            "-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _watch(self) -> None:
        start = self.session.driver.arrivals
        seen, since = start, time.monotonic()
        waiting_since = None        # a push: when a layer was first seen waiting, quiet
        while not self._stop.wait(self.timeout / 4):
            count, now = self.session.driver.arrivals, time.monotonic()
            if count != seen:
                seen, since, waiting_since = count, now, None
            elif now - since >= self.timeout:
                waiting = self._waiting()
                if waiting is None:           # the session moved under us: not stuck
                    continue
                if self.what == "push":
                    # Before a push's first tensor nothing waits (the engine waits for the
                    # trainer); a layer begun since then has waited only from that moment.
                    if not waiting:
                        waiting_since = None
                        continue
                    if waiting_since is None:
                        waiting_since = now
                    if now - waiting_since < self.timeout:
                        continue
                self._warn(waiting, count - start, now - since)
                since = waiting_since = now

    def _waiting(self) -> dict[str, list[str]] | None:
        """The layers in flight and their missing pieces; ``None`` when the session moved
        while they were read."""
        driver = self.session.driver
        try:
            return {rec.name: sorted(rec.missing)
                    for rec in list(driver.plan.layers.values())
                    if rec.state in _WAITING and rec.missing
                    and (rec.name in driver.in_flight or driver.reloading)}
        except RuntimeError:          # a set changed size: the session is not stuck
            return None

    def _warn(self, waiting: dict[str, list[str]], arrivals: int, quiet: float) -> None:
        self.warnings += 1
        log.warning(f"{self.what}_stalled", quiet_s=round(quiet, 3), arrivals=arrivals,
                    layers_in_flight=list(waiting), waiting_for=waiting)
