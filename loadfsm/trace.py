"""Trace events: one per layer transition, plus a few per load.

The library never calls ``structlog.configure``. ``trace=True`` sends events to
``structlog.get_logger("loadfsm")`` (the application's configuration decides
where they go; ``structlog.testing.capture_logs`` sees them). ``trace="f.jsonl"``
writes them as JSON lines to that file through a logger of our own. Warnings
always go to the application's structlog logger as well.

Event names: ``layer_transition``, ``layer_padded``, ``layer_defaulted``,
``tied_weight``, ``layers_in_flight``, ``load_incomplete``, ``unexpected_weights``,
``load_complete``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger("loadfsm")


class Tracer:
    """Fans trace events out to the configured sinks; cheap when there are none."""

    def __init__(self, trace: bool | str | Path | None = None):
        self._sinks: list[Any] = []
        self._file: IO[str] | None = None
        self._t0 = time.perf_counter()
        if trace is True:
            self._sinks.append(log)
        elif trace:
            self._file = open(trace, "w", encoding="utf-8")
            self._sinks.append(structlog.wrap_logger(
                structlog.WriteLogger(self._file),
                processors=[structlog.processors.add_log_level,
                            structlog.processors.TimeStamper(fmt="iso", key="timestamp"),
                            structlog.processors.JSONRenderer()]))

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def transition(self, layer: str, src: str, dst: str, trigger: str, nbytes: int,
                   **extra: Any) -> None:
        if self._sinks:
            self.event("layer_transition", layer=layer, src=src, dst=dst, trigger=trigger,
                       bytes=nbytes, **extra)

    def event(self, name: str, **fields: Any) -> None:
        fields.setdefault("t", round(self.elapsed(), 6))
        for sink in self._sinks:
            sink.info(name, **fields)

    def warning(self, name: str, **fields: Any) -> None:
        """Warnings reach the application's logger even when tracing is off."""
        fields.setdefault("t", round(self.elapsed(), 6))
        for sink in self._sinks:
            sink.warning(name, **fields)
        if log not in self._sinks:
            log.warning(name, **fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
