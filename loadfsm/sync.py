"""RL weight sync: push new weights into a loaded model, in place, layer by layer.

Steps of one push, cited below as P1..P5:
  P1 resolve each pushed name to its layer (checkpoint name or the model's own
     parameter name; one dict lookup);
  P2 the first tensor of a layer fires ``reload`` (FINALIZED -> META): the layer
     expects every piece again, its live kernel tensors stay where they are;
  P3 arrivals run the load path: staging, arrive, complete, quantize (results held
     aside, counted as extra bytes);
  P4 finalize commits: the handler copies the results into the live tensors, so
     every data_ptr, shape, stride and dtype is kept and captured CUDA graphs stay valid;
  P5 at the end, a touched layer still missing required pieces, or any exception,
     rolls back what is in flight (``rollback`` -> FINALIZED, old weights) and raises
     ``PushError`` listing the layers that did commit.

``push`` feeds named tensors; ``push_with`` runs an engine's own ``load_weights`` under
the engine hook in reload mode (``integrations.engine``), whose loader calls feed the
same steps. Both share one implementation (``_run``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .atomic import model_lock
from .errors import ConcurrentPushError, PushError
from .integrations.engine import EngineHook
from .layer import LayerRecord
from .ledger import nbytes
from .report import LoadReport
from .session import COMMIT_BYTES, LoadSession
from .sources.base import iter_weights
from .sources.push import PushRoutes
from .states import LayerState
from .trace import Tracer, failure

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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class PushProgress:
    """One push in flight: the layers it touched and what it received so far."""

    session: LoadSession
    touched: dict[str, LayerRecord] = field(default_factory=dict)
    current: str | None = None          # the tensor (or loader piece) being fed
    received: int = 0
    count: int = 0

    def begin(self, rec: LayerRecord, name: str) -> bool:
        """``name`` is about to feed ``rec``; the layer's first fires ``reload`` (P2).
        Returns whether it was the first."""
        self.current = name
        if rec.name in self.touched:
            return False
        self.touched[rec.name] = rec
        self.session.reload(rec)
        return True

    def done(self, nbytes_in: int) -> None:
        """The tensor ``begin`` named arrived."""
        self.received += nbytes_in
        self.count += 1
        self.current = None


class WeightSync:
    """Pushes new (bf16) weights into a model loaded by ``loadfsm.load`` (or by the
    engine hook: pass its session and use ``push_with``), in place.

    By default the sync re-plans the loaded model (``LoadSession.for_loaded_model``):
    FP8 modules report the bf16 slots they were made from, so layers, pieces and the
    quantization config are those of the original load, and ``WeightSync(model)``
    works on any model loadfsm loaded, in this process or another. Passing the load's
    session reuses it instead; passing its ``LoadReport`` re-plans with the load's own
    pieces and handlers (a report holds no session). All per-layer state stays in the
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

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncReport:
        """Load ``(name, tensor)`` pairs into the live model, in place.

        Names are checkpoint names (fused pieces included) or the model's own parameter
        names (one tensor covering the whole parameter). Layers not named keep their
        weights. Cost: O(tensors pushed + pieces of the touched layers).

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

        def feed(push: PushProgress) -> None:
            for name, tensor in weights:
                push.current = name
                with torch.no_grad():     # trainer tensors may require grad
                    self._arrive(name, tensor.detach(), push)
                push.done(nbytes(tensor))

        return self._run(feed)

    def push_with(self, load: Callable[[], object]) -> SyncReport:
        """Run an engine's own loading code as a push, in place:
        ``sync.push_with(lambda: model.load_weights(new_weights))``.

        For models loaded through the engine hook (``with LoadSession(model) as s``).
        While ``load`` runs (under ``torch.no_grad()``), the live parameters' loaders
        are wrapped: each call writes its shard into fresh staging of its layer, and a
        complete layer is quantized and committed as in ``push``. Afterwards every
        parameter's ``weight_loader`` attribute is exactly what it was (also when
        ``load`` raises). Layers ``load`` does not reach keep their weights.

        Returns:
            A ``SyncReport``; its tensor and byte counts are of loader calls.

        Raises:
            PushError: as ``push``: a touched layer did not receive all its pieces, or
                ``load`` raised (the cause is chained).
        """
        def feed(push: PushProgress) -> None:
            hook = EngineHook(self.session, push).install()
            try:
                with torch.no_grad():
                    load()
            finally:
                hook.restore()

        return self._run(feed)

    def _run(self, feed: Callable[[PushProgress], None]) -> SyncReport:
        """One push under the model's push lock: ``feed`` makes the arrivals (P1..P3),
        then settle, commit, report."""
        lock = model_lock(self.model)
        if not lock.acquire(blocking=self.wait):
            error = ConcurrentPushError("another push into this model is in progress; "
                                        "nothing was changed", committed=[])
            self.session.tracer.event("push_failed", **failure(error, committed=[]))
            raise error
        try:
            self._recover()
            return self._push(feed)
        finally:
            lock.release()

    def _recover(self) -> None:
        """Roll back layers an interrupted rollback left unfinished (a second Ctrl-C):
        the model's tensors are the old ones, only the records lag."""
        self.session.held = []
        stuck = {rec.name: rec for rec in self.session.plan.layers.values()
                 if rec.state is not LayerState.FINALIZED}
        self._roll_back(stuck)

    def _push(self, feed: Callable[[PushProgress], None]) -> SyncReport:
        session, ledger = self.session, self.session.ledger
        t0 = time.perf_counter()
        base, outer_peak = ledger.staging + ledger.final, ledger.peak
        ledger.peak = base
        push = PushProgress(session)
        committed = session.committed = []
        session.held, session.hold_all = [], self.atomic == "model"
        session.commit_bytes = self.commit_bytes
        try:
            try:
                feed(push)
                with torch.no_grad():
                    missing = self._settle(push.touched)
                    if not (missing and session.hold_all):   # atomic="model": all or none
                        session.commit_held()                           # P4
            except BaseException as exc:
                try:
                    rolled = self._roll_back(push.touched)
                finally:
                    session.tracer.event("push_failed", **failure(
                        exc, tensor=getattr(exc, "tensor", None) or push.current,
                        committed=list(committed)))
                if not isinstance(exc, Exception):
                    raise
                current = push.current
                where = (f"at tensor {current!r}" if current is not None
                         else f"after {push.count} tensor(s)")
                raise PushError(f"push failed {where}: {type(exc).__name__}: {exc}; "
                                f"rolled back {rolled}; committed {committed}",
                                committed=list(committed), tensor=current,
                                file=getattr(exc, "file", None),
                                layer=getattr(exc, "layer", None)) from exc
            if missing:
                rolled = self._roll_back(push.touched)
                lines = [f"  {layer}: missing {', '.join(names)}"
                         for layer, names in missing.items()]
                error = PushError(f"{len(missing)} pushed layer(s) did not receive all "
                                  "their pieces and keep their old weights:\n"
                                  + "\n".join(lines)
                                  + f"\nrolled back {rolled}; committed {committed}",
                                  committed=list(committed), layer=next(iter(missing)))
                session.tracer.event("push_failed", **failure(error,
                                                              committed=list(committed)))
                raise error
        finally:
            session.held, session.hold_all = [], False
            peak_extra = ledger.peak - base
            ledger.peak = max(outer_peak, ledger.peak)
        report = SyncReport(layers_updated=len(committed), bytes_received=push.received,
                            tensors_received=push.count, seconds=time.perf_counter() - t0,
                            peak_extra_bytes=peak_extra, committed=committed)
        session.tracer.event("push_complete", **report.to_dict())
        return report

    def _arrive(self, name: str, tensor: torch.Tensor, push: PushProgress) -> None:
        route = self._routes.resolve(name, tensor.shape)                   # P1
        rec = route.rec
        first = push.begin(rec, name)                                      # P2
        if not first and route.tied and not self._due(rec, route):
            # The other name of a tied tensor already fed it in this push.
            self.session.tracer.event("tied_weight", alias=name, canonical=route.name,
                                      skipped=True)
            return
        if route.param is None:                                            # P3, P4
            self.session.arrive(route.name, tensor)
        else:
            self.session.arrive_param(rec, route.param, tensor, route.pieces)

    @staticmethod
    def _due(rec: LayerRecord, route) -> bool:
        names = route.pieces if route.param is not None else (route.name,)
        return all(name in rec.missing for name in names)

    def _settle(self, touched: dict[str, LayerRecord]) -> dict[str, list[str]]:
        """Default optional pieces of touched layers and keep their unpushed buffers;
        return the layers still missing required pieces."""
        missing = {}
        for rec in touched.values():
            if rec.state in (LayerState.META, LayerState.PARTIAL):
                self._keep_live_buffers(rec)
            if rec.state not in (LayerState.META, LayerState.PARTIAL):
                continue
            due = rec.required_missing()
            if due:
                missing[rec.name] = due
                continue
            self.session.complete_with_defaults(rec)
        return missing

    def _keep_live_buffers(self, rec: LayerRecord) -> None:
        """A trainer's ``named_parameters()`` carries no buffers: a touched layer's
        persistent buffers that were not pushed (DeepSeek-V3's ``e_score_correction_bias``)
        arrive from their live values, so the layer completes with them unchanged."""
        kept = [name for name in rec.required_missing()
                if rec.slots[rec.slot_attr(rec.pieces[name].param)].is_buffer]
        if not kept:
            return
        live = rec.handler.live_tensors(rec)
        self.session.tracer.event("buffers_kept", layer=rec.name, pieces=kept)
        for name in kept:
            piece = rec.pieces[name]
            tensor = live[rec.slot_attr(piece.param)]
            self.session.arrive(name, tensor[piece.region] if piece.region else tensor)

    def _roll_back(self, touched: dict[str, LayerRecord]) -> list[str]:
        """P5: every touched layer not committed returns to FINALIZED with old weights."""
        rolled = [rec for rec in touched.values() if rec.state is not LayerState.FINALIZED]
        for rec in rolled:
            self.session.rollback(rec)
        if rolled:
            self.session.tracer.event("push_rolled_back", layers=[r.name for r in rolled])
        return [rec.name for rec in rolled]

    def close(self) -> None:
        """Close the trace file, if the sync writes one."""
        self.session.tracer.close()
