"""RL weight sync: push new weights into a loaded model, in place, layer by layer.

Each pushed name resolves to its layer in one dict lookup (``routes``); the push runs as
a reload transaction (``transaction``: R1..R4), so every layer ends wholly old or wholly
new and the live tensors keep their storage. ``feed`` functions make the arrivals: named
tensors here (``push``), an engine's own ``load_weights`` in the engine integration
(``loadfsm.WeightSync.push_with``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..atomic import model_lock
from ..errors import ConcurrentPushError, PushError
from ..loading.finiteness import COMMIT_BYTES
from ..loading.session import LoadSession
from ..report import LoadReport
from ..sources.base import iter_weights
from ..states import LayerState
from ..trace import Tracer, failure
from .routes import PushRoutes
from .transaction import ReloadTransaction

ATOMIC_MODES = ("layer", "model")


@dataclass
class SyncReport:
    """Figures of one push.

    ``peak_extra_bytes`` is the most the session held beyond the loaded model during
    the push (staging plus quantized results not yet committed), from its ledger.
    """

    layers_updated: int
    bytes_received: int
    tensors_received: int
    seconds: float
    peak_extra_bytes: int
    committed: list[str] = field(default_factory=list)
    version: object = None

    def to_dict(self) -> dict:
        return asdict(self)


class WeightSync:
    """Pushes new (bf16) weights into a model loaded by ``loadfsm.load`` (or by the
    engine hook: pass its session and use ``push_with``), in place.

    By default the sync re-plans the loaded model (``LoadSession.for_loaded_model``):
    FP8 modules report the bf16 slots they were made from, so layers, pieces and the
    quantization config are those of the original load, and ``WeightSync(model)``
    works on any model loadfsm loaded, in this process or another. Passing the load's
    session reuses it instead; passing its ``LoadReport`` re-plans with the load's own
    pieces (a report holds no session). All per-layer state stays in the
    session's records.

    One push runs at a time per model, across every ``WeightSync`` on it: a push that
    finds another in progress raises ``ConcurrentPushError`` at once (``wait=True``:
    it waits for its turn instead).

    Args:
        model: the model ``session`` loaded.
        session: optional: the ``LoadSession`` of that load, or the ``LoadReport`` it
            returned; by default the model is re-planned.
        atomic: ``"layer"`` (default): a layer commits once its new tensors are complete,
            quantized and verified free of NaN/Inf. Verification is one device sync per
            ``commit_bytes`` of quantized results, so that much extra memory is held.
            ``"model"``: nothing commits until every touched layer is quantized; the
            push then holds the quantized copies of all touched layers at once (about
            the size of the loaded model's touched part) and, on failure, commits none.
        device: the device of the loaded model (defaults to the session's); a receiver
            puts its buckets there.
        trace: as in ``loadfsm.load``: ``True``, a JSONL path, or ``None``.
        wait: a push waits for another push into the same model to end, rather than
            raising ``ConcurrentPushError``.

    Attributes:
        version: the ``version`` of the last push that committed wholly (``None``
            before one).
        layer_versions: per layer, the ``version`` of the last push that committed it
            (``None``: not pushed since the load); a failed push stamps the layers it
            committed.

    Raises:
        ValueError: ``session`` did not load ``model``, a layer is not FINALIZED, or an
            unknown ``atomic`` mode.
    """

    def __init__(self, model: nn.Module, *, session: LoadSession | LoadReport | None = None,
                 atomic: str = "layer", device=None, trace=None,
                 commit_bytes: int = COMMIT_BYTES, wait: bool = False):
        loaded_by = (session.replan.model() if isinstance(session, LoadReport)
                     else model if session is None else session.model)
        if loaded_by is not model:
            raise ValueError("session did not load this model; pass the session (or "
                             "report) that loadfsm.load returned for it")
        if not isinstance(session, LoadSession):
            session = LoadSession.for_loaded_model(
                model, replan=session.replan if session is not None else None)
        if atomic not in ATOMIC_MODES:
            raise ValueError(f"atomic must be one of {ATOMIC_MODES}, got {atomic!r}")
        if device is not None and torch.device(device) != session.device:
            raise ValueError(f"model was loaded on {session.device}, not {device}")
        unfinished = [rec.name for rec in session.plan.layers.values()
                      if rec.state is not LayerState.FINALIZED]
        if unfinished:
            raise ValueError(f"layers not FINALIZED cannot take pushes: {unfinished}")
        self.model, self.session, self.atomic = model, session, atomic
        self.commit_bytes = commit_bytes
        self.wait = wait
        self.device = session.device
        session.tracer = Tracer(trace)
        session.on_layer_done = None          # the load's progress bar is gone
        self._routes = PushRoutes(session.plan)
        self.version = None
        self.layer_versions: dict[str, object] = dict.fromkeys(session.plan.layers)

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
             version=None) -> SyncReport:
        """Load ``(name, tensor)`` pairs into the live model, in place.

        Names are checkpoint names (fused pieces included) or the model's own parameter
        names (one tensor covering the whole parameter). Layers not named keep their
        weights. Cost: O(tensors pushed + pieces of the touched layers).

        ``version`` (any value; a step number, a string) is stamped on every layer that
        commits (``layer_versions``); ``sync.version`` becomes it once the whole push
        has committed. The trace's ``push_complete`` carries it.

        Returns:
            A ``SyncReport``.

        Raises:
            PushError: a touched layer did not receive all its pieces, or the push failed
                midway (the cause is chained). Layers still in flight keep their old
                weights; ``committed`` lists those that took new ones. Retrying succeeds.
                A Ctrl-C (``KeyboardInterrupt``) leaves the same way: every layer wholly
                old or wholly new, the trace's ``push_failed`` saying which committed.
            ConcurrentPushError: another push into this model is in progress.
        """
        weights = iter_weights(named_tensors)

        return self.run(lambda push: push.feed(weights, self._routes), version=version)

    def run(self, feed: Callable[[ReloadTransaction], None], *,
            version=None) -> SyncReport:
        """One push under the model's push lock: ``feed`` makes the arrivals of the
        transaction it is given (R1, R2); then settle, commit, report. The layers that
        committed are stamped ``version``, also when the push fails."""
        lock = model_lock(self.model)
        if not lock.acquire(blocking=self.wait):
            error = ConcurrentPushError("another push into this model is in progress; "
                                        "nothing was changed", committed=[])
            self.session.tracer.event("push_failed", **failure(error, committed=[]))
            raise error
        try:
            return self._push(feed, version)
        finally:
            lock.release()

    def _push(self, feed: Callable[[ReloadTransaction], None], version) -> SyncReport:
        session = self.session
        t0 = time.perf_counter()
        push = ReloadTransaction(session, hold_all=self.atomic == "model",
                                 commit_bytes=self.commit_bytes)
        with push, self._stamping(push, version):
            # Layers an interrupted rollback left unfinished (a second Ctrl-C): the
            # model's tensors are the old ones, only the records lag.
            push.roll_back([rec for rec in session.plan.layers.values()
                            if rec.state is not LayerState.FINALIZED])
            try:
                feed(push)
                with torch.no_grad():
                    missing = push.settle()
                    if not (missing and push.hold_all):   # atomic="model": all or none
                        session.commit_held()                                   # R3
            except BaseException as exc:
                self._fail(push, exc)
            if missing:
                self._fail_incomplete(push, missing)
        report = SyncReport(layers_updated=len(push.committed), bytes_received=push.received,
                            tensors_received=push.count, seconds=time.perf_counter() - t0,
                            peak_extra_bytes=push.peak_extra, committed=push.committed,
                            version=version)
        self.version = version
        if session.tracer.enabled:      # asdict costs more than a small push's commits
            session.tracer.event("push_complete", **report.to_dict())
        return report

    @contextmanager
    def _stamping(self, push: ReloadTransaction, version):
        """After the transaction, however it ends: its committed layers serve ``version``."""
        try:
            yield
        finally:
            for name in push.committed:
                self.layer_versions[name] = version

    def _fail(self, push: ReloadTransaction, exc: BaseException) -> None:
        """R4 after an exception: roll back, trace, raise ``PushError`` (a Ctrl-C is
        re-raised as it is)."""
        committed = list(push.committed)
        try:
            rolled = push.roll_back()
        finally:
            self.session.tracer.event("push_failed", **failure(
                exc, tensor=getattr(exc, "tensor", None) or push.current,
                committed=committed))
        if not isinstance(exc, Exception):
            raise exc
        where = (f"at tensor {push.current!r}" if push.current is not None
                 else f"after {push.count} tensor(s)")
        raise PushError(f"push failed {where}: {type(exc).__name__}: {exc}; "
                        f"rolled back {rolled}; committed {committed}",
                        committed=committed, tensor=push.current,
                        file=getattr(exc, "file", None),
                        layer=getattr(exc, "layer", None)) from exc

    def _fail_incomplete(self, push: ReloadTransaction, missing: dict[str, list[str]]) -> None:
        """R4 for layers the push left without all their pieces."""
        rolled = push.roll_back()
        committed = list(push.committed)
        lines = [f"  {layer}: missing {', '.join(names)}" for layer, names in missing.items()]
        error = PushError(f"{len(missing)} pushed layer(s) did not receive all "
                          "their pieces and keep their old weights:\n" + "\n".join(lines)
                          + f"\nrolled back {rolled}; committed {committed}",
                          committed=committed, layer=next(iter(missing)))
        self.session.tracer.event("push_failed", **failure(error, committed=committed))
        raise error

    def close(self) -> None:
        """Close the trace file, if the sync writes one."""
        self.session.tracer.close()

