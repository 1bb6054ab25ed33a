"""LoadSession: one load of a model built on ``meta``, composed of its parts.

Planning (``planning``), the arrival driver (``driver``), the finiteness batch
(``finiteness``), the model writer (``writer``) and the report (``report_builder``)
each do one job; the session wires them and owns the end of a load: defaults for
optional pieces, the last verification, buffers, strictness, the report, or, when the
load fails, nothing unverified left installed. A reload transaction
(``loadfsm.reload``) attaches to a loaded session for the length of a push.
Lifecycle: ARCHITECTURE.md.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable, Iterable

import torch
from torch import nn

from ..atomic import deferred_interrupts
from ..errors import IncompleteLoadError
from ..layer import LayerRecord
from ..ledger import MemoryLedger, nbytes
from ..pieces import Piece
from ..plan import TensorEntry
from ..profiling import layer_range
from ..quant.config import quant_name, resolve_quant
from ..report import LoadReport, Replan
from ..states import LayerState
from ..trace import Tracer, failure
from .driver import ArrivalDriver
from .finiteness import FinitenessBatch
from .planning import left_unquantized, loaded_config, match_headers, plan_model
from .report_builder import build_report, cuda_baseline
from .warmup import KernelWarmup
from .writer import ModelWriter

_DONE = (LayerState.QUANTIZED, LayerState.FINALIZED)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadSession:
    """One load of a model built on ``meta``.

    Args:
        model: any ``nn.Module``; parameters to load live on ``meta``.
        quant: ``None``, ``"fp8"``, ``"fp8-channel"``, ``"fp8-block"``, ``"int8"`` or a
            config (``Fp8Config``, ``Int8Config``, a registered handler's own).
        device: target device; the best available when ``None``.
        trace: ``True`` for structlog events, a path for a JSONL file, ``None`` for none.
        strict: raise on missing or unexpected tensors (else report them).
        max_in_flight: warn once when more layers than this hold staging at once.
        on_layer_done: called with each layer's record when it reaches FINALIZED.
        pieces: the checkpoint pieces of fused or renamed tensors, in place of the
            model's own ``checkpoint_pieces`` (see ``loadfsm.pieces``).
    """

    def __init__(self, model: nn.Module, *, quant=None, device=None, trace=None,
                 strict: bool = True, max_in_flight: int = 2,
                 on_layer_done: Callable[[LayerRecord], None] | None = None,
                 pieces: Iterable[Piece] | None = None):
        self.model = model
        self.device = torch.device(device) if device is not None else default_device()
        self.quant = resolve_quant(quant)
        self.strict = strict
        self.on_layer_done = on_layer_done
        pieces = None if pieces is None else tuple(pieces)   # may be an iterator: read once
        self.replan = Replan(weakref.ref(model), pieces)
        self.plan = plan_model(model, self.quant, pieces)
        self.ledger = MemoryLedger()
        self.batch = FinitenessBatch()
        self.writer = ModelWriter(model)
        hold = weakref.WeakMethod(self._hold)     # no cycle: a session dies with its caller
        self.driver = ArrivalDriver(self.plan, device=self.device, config=self.quant,
                                    ledger=self.ledger, tracer=Tracer(trace), strict=strict,
                                    max_in_flight=max_in_flight,
                                    on_quantized=lambda rec: hold()(rec))
        if self.device.type == "cuda":
            warmup = KernelWarmup({rec.handler for rec in self.plan.layers.values()},
                                  self.quant, self.driver.device)
            self.driver.warmup = None if warmup.done() else warmup
        self.transaction = None       # a reload transaction while a push runs
        # The engine hook's first load: parameter name -> (the engine's weight_loader, its
        # other attributes). A reload runs these on the live (FP8) parameters.
        self.engine_loaders: dict[str, tuple[Callable, dict]] = {}
        self._index: dict[str, str] = {}
        self._absent: dict[str, list[str]] = {}      # layer -> names the checkpoint lacks
        self._started = time.perf_counter()
        self._cuda_base = cuda_baseline(self.device)
        for alias, canonical in self.plan.tied.items():
            self.tracer.event("tied_weight", alias=alias, canonical=canonical)
        left = left_unquantized(self.plan, self.quant)
        if left:
            self.tracer.warning("layers_left_unquantized", quant=quant_name(self.quant),
                                count=len(left), layers=list(left)[:20],
                                quantized_by=sorted({s for v in left.values() for s in v}))

    @classmethod
    def for_loaded_model(cls, model: nn.Module, *, trace=None,
                         replan: Replan | None = None) -> "LoadSession":
        """A session over a model loaded earlier (by this or another process): every
        layer FINALIZED, its live tensors the model's own. Re-planned from the model:
        kernel modules report the full-precision slots they were made from, so the plan,
        the pieces and the config are those of the original load (``replan``: the
        load's own pieces, from its report)."""
        config = loaded_config(model)
        first = next(iter([*model.parameters(), *model.buffers()]), None)
        device = first.device if first is not None else default_device()
        session = cls(model, quant=config, device=device, trace=trace,
                      pieces=replan.pieces if replan is not None else None)
        for rec in session.plan.layers.values():
            rec.state = LayerState.FINALIZED      # initial state of a live layer
            rec.final_bytes = sum(nbytes(t) for t in rec.handler.live_tensors(rec).values())
            session.ledger.add_final(rec.final_bytes)
        return session

    # -- the driver's face -------------------------------------------------------------
    @property
    def tracer(self) -> Tracer:
        return self.driver.tracer

    @tracer.setter
    def tracer(self, tracer: Tracer) -> None:
        self.driver.tracer = tracer

    def arrive(self, name: str, tensor: torch.Tensor) -> None:
        """Route one checkpoint tensor to its layer (``ArrivalDriver.arrive``)."""
        self.driver.arrive(name, tensor)

    @property
    def file_of(self) -> Callable[[str], str | None]:
        """Which file holds a checkpoint name (for errors); set by the source's driver."""
        return self.driver.file_of

    @file_of.setter
    def file_of(self, file_of: Callable[[str], str | None]) -> None:
        self.driver.file_of = file_of

    def match(self, entries: dict[str, TensorEntry], index: dict[str, str]) -> list[str]:
        """Check the plan against a checkpoint's headers; return the read order.

        Raises:
            UnexpectedWeightError, IncompleteLoadError: with ``strict``.
        """
        matched = match_headers(self.plan, entries, self.tracer)
        self._index = index
        self.driver.unexpected.extend(matched.unexpected)
        if matched.unexpected and self.strict:
            raise self.driver.unexpected_error()
        self._absent = matched.absent
        if matched.absent and self.strict:
            raise IncompleteLoadError.listing(matched.absent, index)
        return matched.order

    # -- QUANTIZED -> FINALIZED ----------------------------------------------------------
    def _hold(self, rec: LayerRecord) -> None:
        # A borrowed tensor is the caller's: committed before its iterator moves on.
        if self.batch.hold(rec) or self.driver.borrowed(rec):
            self.commit_held()

    def commit_held(self) -> None:
        """Verify the held results (one device sync), then install (first load) or
        commit them in place (reload), layer by layer.

        A layer holding NaN/Inf raises ``NonFiniteWeightError``; the held layers stay
        QUANTIZED (for ``fail`` or the push's rollback), so no live tensor saw the bad
        values. Layers not finalized when an exception leaves stay held.
        """
        self.batch.verify(self.batch.held, self.tracer, self.driver.file_of)
        held = self.batch.take()
        try:
            for rec in held:
                with layer_range(rec.name, "commit"):
                    self.finalize(rec)
        finally:
            self.batch.held = [rec for rec in held if rec.state is LayerState.QUANTIZED]

    def finalize(self, rec: LayerRecord) -> None:
        """Install (first load) or commit in place (reload) a verified layer.

        The tensors and the record change together under held SIGINT: a Ctrl-C lands
        after the layer is wholly new and FINALIZED (an exception from the handler or
        the writer leaves it wholly old and QUANTIZED)."""
        with deferred_interrupts():
            if self.transaction is not None:
                self.transaction.commit(rec)
            else:
                self.writer.install(rec, rec.handler.install(rec, self.quant))
            rec.results = {}
            src, dst = rec.fire("finalize")
            self.driver.transition(rec, src, dst, "finalize")
        if self.on_layer_done is not None:
            self.on_layer_done(rec)

    # -- the end of a load -----------------------------------------------------------------
    def finish(self) -> LoadReport:
        """Default what may be defaulted, compute buffers, enforce strictness, report."""
        for rec in self.plan.layers.values():
            if rec.state in _DONE or rec.required_missing():     # held or installed
                continue
            self.driver.complete_with_defaults(rec)
        self.commit_held()
        self.writer.compute_buffers(self.device)
        missing = self._missing()
        for name in missing:                  # incomplete layers keep no staging
            self.driver.drop(self.plan.layers[name])
        report = build_report(self.plan, self.ledger, self.driver, config=self.quant,
                              started=self._started, cuda_base=self._cuda_base,
                              missing=missing)
        report.replan = self.replan   # for WeightSync(model, session=report); not a field
        if missing:
            self.tracer.warning("load_incomplete", missing=missing)
        if self.driver.unexpected:
            self.tracer.warning("unexpected_weights", names=sorted(self.driver.unexpected))
        if missing and self.strict:
            raise IncompleteLoadError.listing(missing, self._index)
        self.tracer.event("load_complete", **{k: v for k, v in report.to_dict().items()
                                              if k != "layer_states"})
        self.tracer.close()
        return report

    def _missing(self) -> dict[str, list[str]]:
        """Per layer, the required names that did not arrive (or that the checkpoint lacks)."""
        return {rec.name: self._absent.get(rec.name) or rec.required_missing()
                for rec in self.plan.layers.values() if rec.required_missing()}

    def fail(self, exc: BaseException) -> None:
        """A first load that raised: trace ``load_failed``, then drop the staging of every
        layer in flight and the unverified results of every held layer (back to META).
        Nothing unverified was installed: finalized layers hold verified tensors, the
        others keep their ``meta`` parameters."""
        with deferred_interrupts():
            for rec in [*self.driver.in_flight.values(), *self.batch.take()]:
                self.driver.drop(rec)
                if rec.state is not LayerState.META:
                    src, dst = rec.fire("abandon")
                    self.driver.transition(rec, src, dst, "abandon")
            self.tracer.event("load_failed", **failure(exc))
            self.tracer.close()
