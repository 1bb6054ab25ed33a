"""Trace events: one per layer transition, plus a few per load.

The library never calls ``structlog.configure``. ``trace=True`` sends events to
``structlog.get_logger("loadfsm")`` (the application's configuration decides
where they go; ``structlog.testing.capture_logs`` sees them). ``trace="f.jsonl"``
writes them as JSON lines to that file through a logger of our own. Warnings
always go to the application's structlog logger as well.

Event names: ``layer_transition``, ``layer_padded``, ``layer_defaulted``,
``tied_weight``, ``layers_in_flight``, ``load_incomplete``, ``unexpected_weights``,
``fp8_underflow``, ``load_complete``, ``load_failed``, ``push_failed``.

The trace is best effort: a sink that raises (a full disk) is dropped with one
``trace_sink_failed`` warning, and the load or push goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger("loadfsm")


class Tracer:
    """Fans trace events out to the configured sinks; cheap when there are none."""

    def __init__(self, trace: bool | str | Path | None = None):
        self._sinks: tuple[Any, ...] = ()
        self._file: IO[str] | None = None
        self._t0 = time.perf_counter()
        self._sink_failed = False
        if trace is True:
            self._sinks = (_Structlog(log),)
        elif trace:
            self._file = open(trace, "w", encoding="utf-8")
            self._sinks = (_JsonLines(self._file),)

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def transition(self, layer: str, src: str, dst: str, trigger: str, nbytes: int,
                   **extra: Any) -> None:
        if self._sinks:
            fields = {"layer": layer, "src": src, "dst": dst, "trigger": trigger,
                      "bytes": nbytes}
            fields.update(extra)
            self._emit("info", "layer_transition", fields)

    def event(self, name: str, **fields: Any) -> None:
        if self._sinks:
            self._emit("info", name, fields)

    def warning(self, name: str, **fields: Any) -> None:
        """Warnings reach the application's logger even when tracing is off."""
        self._emit("warning", name, fields)
        if not any(isinstance(sink, _Structlog) for sink in self._sinks):
            log.warning(name, **fields)

    def _emit(self, level: str, name: str, fields: dict) -> None:
        if "t" not in fields:
            fields["t"] = round(time.perf_counter() - self._t0, 6)
        for sink in self._sinks:
            try:
                sink.emit(level, name, fields)
            except Exception as exc:       # noqa: BLE001 - any sink failure, see module doc
                self._sinks = tuple(s for s in self._sinks if s is not sink)
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if not self._sink_failed:
            self._sink_failed = True
            log.warning("trace_sink_failed", error=type(exc).__name__, message=str(exc))

    def close(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        for sink in self._sinks:
            if isinstance(sink, _JsonLines):
                try:
                    sink.flush()          # the transitions it still holds
                except Exception as exc:       # noqa: BLE001 - as in _emit
                    self._sinks = tuple(s for s in self._sinks if s is not sink)
                    self._failed(exc)
        try:
            file.close()
        except OSError as exc:
            self._failed(exc)


class _Structlog:
    """The ``trace=True`` sink: the application's structlog logger."""

    def __init__(self, logger):
        self._logger = logger

    def emit(self, level: str, name: str, fields: dict) -> None:
        getattr(self._logger, level)(name, **fields)


class _JsonLines:
    """The ``trace="f.jsonl"`` sink: one JSON object per line (``event``, ``level``, the
    fields; ``t`` is the trace's monotonic clock). Transitions are held and written in
    one batch at most every ``FLUSH_S``; every other event is written at once, after the
    transitions before it, and flushed: a killed process loses at most the last
    ``FLUSH_S`` of transitions. A batch is encoded in one go with one encoder: between
    a load's arrivals the caches are cold, and a transition encoded on its own costs
    several times more there (structlog's ``WriteLogger`` flushed every line and stamped
    every event with the wall clock: 3x the cost per event again)."""

    FLUSH_S = 0.05
    _encode = json.JSONEncoder(default=str).encode

    def __init__(self, file: IO[str]):
        self._file = file
        self._held: list[tuple[str, str, dict]] = []     # (level, name, fields) unwritten
        self._flushed = time.monotonic()

    def emit(self, level: str, name: str, fields: dict) -> None:
        self._held.append((level, name, fields))
        if name != "layer_transition" or time.monotonic() - self._flushed > self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        held, self._held = self._held, []
        encode, write = self._encode, self._file.write
        for level, name, fields in held:        # a write per line: a full disk fails at one
            write(encode({"event": name, "level": level, **fields}) + "\n")
        self._file.flush()
        self._flushed = time.monotonic()


def failure(exc: BaseException, **extra: Any) -> dict[str, Any]:
    """Fields of a ``load_failed`` / ``push_failed`` event: the error's class name, its
    message, and the tensor, file and layer it names (``None`` where it names none)."""
    return {"error": type(exc).__name__, "message": str(exc),
            "tensor": getattr(exc, "tensor", None), "file": getattr(exc, "file", None),
            "layer": getattr(exc, "layer", None), **extra}
