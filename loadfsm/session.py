"""LoadSession: plans layers, routes arrivals, fires triggers, keeps the ledger.

The steps of one load, cited below as L1..L6:
  L1 plan every layer and its pieces from the model (no data read);
  L2 match the plan against the source's headers: shapes, dtypes, unknown and
     missing names fail before a byte of data is read;
  L3 read in layer order; a layer's first piece materializes its staging (META -> PARTIAL);
     each piece's max|x| is recorded on the device (NaN/Inf show there, no sync);
  L4 its last piece completes it; the handler quantizes it and its staging is
     freed at once (COMPLETE -> QUANTIZED);
  L5 quantized layers wait in ``held`` until verified: every ``commit_bytes`` the
     recorded max|x| (and FP8 underflow counts) are checked with one device sync, then
     the handler installs the kernel tensors (first load) or copies them in place
     (reload), each layer whole under held SIGINT (QUANTIZED -> FINALIZED). A failed
     load installs nothing unverified (``fail``: the layers go back to META);
  L6 the finalize sweep: defaults for optional pieces, the last verification,
     non-persistent buffers, strictness, the report.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .atomic import deferred_interrupts
from .errors import (DuplicateWeightError, IncompleteLoadError, ModelStateError,
                     NonFiniteWeightError, UnexpectedWeightError)
from .handlers.base import HANDLERS, Handler
from .layer import LayerRecord
from .ledger import MemoryLedger, nbytes
from .pieces import Piece
from .plan import TensorEntry, check_fits, plan_layers
from .profiling import layer_range
from .handlers.fp8 import quant_name
from .handlers.kernels import installers
from .integrations.engine_shards import buffer_init, loader_pieces, uses_weight_loaders
from .quant.config import resolve_quant
from .quant.fp8 import flushed_to_zero, sample_rows
from .report import LoadReport
from .states import LayerState
from .trace import Tracer, failure


COMMIT_BYTES = 512 << 20     # bytes loaded (or reload results held) per NaN/Inf verification
# Warn when more than this fraction of a tensor's nonzero values become zero in FP8: a
# normal weight loses ~1e-5 of them; a scale set by a far outlier loses most.
UNDERFLOW_WARN_FRACTION = 0.01
UNDERFLOW_SAMPLE = 1 << 18    # elements of each FP8 weight counted for the underflow warning
_DONE = (LayerState.QUANTIZED, LayerState.FINALIZED)


@dataclass(frozen=True)
class Replan:
    """What re-planning a loaded model needs besides the model itself: the load's
    ``pieces`` and extra ``handlers`` (``WeightSync(model, session=report)`` uses it),
    and a weak reference to the model it loaded (a report never keeps a model alive)."""

    model: "weakref.ref[nn.Module]"
    pieces: tuple[Piece, ...] | None
    handlers: tuple[str, ...]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoadSession:
    """One load (or reload) of a model built on ``meta``.

    Args:
        model: any ``nn.Module``; parameters to load live on ``meta``.
        quant: ``None``, ``"fp8"``, ``"fp8-channel"``, ``"fp8-block"`` or an ``Fp8Config``.
        device: target device; the best available when ``None``.
        trace: ``True`` for structlog events, a path for a JSONL file, ``None`` for none.
        strict: raise on missing or unexpected tensors (else report them).
        max_in_flight: warn once when more layers than this hold staging at once.
        on_layer_done: called with each layer's record when it reaches FINALIZED.
        pieces: the checkpoint pieces of fused or renamed tensors, in place of the
            model's own ``checkpoint_pieces`` (see ``loadfsm.pieces``).
        handlers: names of registered handlers tried before the built-in ones (an
            integration's handler for module kinds loadfsm does not know).
    """

    def __init__(self, model: nn.Module, *, quant=None, device=None, trace=None,
                 strict: bool = True, max_in_flight: int = 2,
                 on_layer_done: Callable[[LayerRecord], None] | None = None,
                 pieces: Iterable[Piece] | None = None, handlers: Sequence[str] = ()):
        self.model = model
        self.device = torch.device(device) if device is not None else default_device()
        self.quant = resolve_quant(quant)
        self.strict = strict
        self.max_in_flight = max_in_flight
        self.on_layer_done = on_layer_done
        # Quantized layers wait here until their finiteness is verified (one device
        # sync per ``commit_bytes`` of results, or per push with ``hold_all``).
        self.held: list[LayerRecord] = []
        self.hold_all = False
        self.commit_bytes = COMMIT_BYTES
        self.committed: list[str] = []
        self._held_bytes = 0
        self.replan = Replan(weakref.ref(model), None if pieces is None else tuple(pieces),
                             tuple(handlers))
        self.ledger = MemoryLedger()
        self.handlers = self._build_handlers(handlers)
        pieces = self.replan.pieces           # ``pieces`` may be an iterator: read once
        if (pieces is None and not hasattr(model, "checkpoint_pieces")
                and uses_weight_loaders(model)):
            pieces = loader_pieces(model)     # an engine model: pieces are loader calls
        self.plan = plan_layers(model, self.handlers, pieces)              # L1
        self._check_replannable()
        self._name_modules()
        self.tracer = Tracer(trace)
        self._hook = None
        # The engine hook's first load: parameter name -> (the engine's weight_loader, its
        # other attributes). A reload runs these on the live (FP8) parameters.
        self.engine_loaders: dict[str, tuple[Callable, dict]] = {}
        self.in_flight: dict[str, LayerRecord] = {}
        self.unexpected: list[str] = []
        self.file_of: Callable[[str], str | None] = lambda name: None
        self._index: dict[str, str] = {}
        self._tied_used: dict[str, str] = {}
        self._absent: dict[str, list[str]] = {}      # layer -> names the checkpoint lacks
        self._bytes_read = 0
        self.arrivals = 0             # pieces arrived; the watchdog polls it
        self._largest = 0
        self._largest_output = 0
        self._peak_in_flight = 0
        self._warned_in_flight = False
        self._t0 = time.perf_counter()
        self._cuda_base = self._cuda_reset()
        for alias, canonical in self.plan.tied.items():
            self.tracer.event("tied_weight", alias=alias, canonical=canonical)

    def _check_replannable(self) -> None:
        """A kernel module (one that says which full-precision slots feed it) claimed by
        a handler that would load those tensors as they are would end up holding bf16
        weights beside stale scales: refuse (a model loaded with FP8, loaded again
        without)."""
        stale = [rec.name for rec in self.plan.layers.values()
                 if callable(getattr(rec.module, "full_precision_slots", None))
                 and not rec.handler.makes_new_tensors]
        if stale:
            kind = type(self.plan.layers[stale[0]].module).__name__
            raise ModelStateError(
                f"{len(stale)} layer(s) hold kernel modules ({kind}) from an earlier "
                f"quantized load that quant={self.quant!r} cannot replace; "
                "build the model again on meta, or load it with an FP8 scheme",
                layer=stale[0])

    def _name_modules(self) -> None:
        """Every name a layer's module is registered at (a module shared by two parents
        takes its kernel form under both)."""
        by_module = {id(rec.module): rec for rec in self.plan.layers.values()}
        for name, module in self.model.named_modules(remove_duplicate=False):
            rec = by_module.get(id(module))
            if rec is not None and name:
                rec.names.append(name)

    @classmethod
    def for_loaded_model(cls, model: nn.Module, *, trace=None,
                         replan: Replan | None = None) -> "LoadSession":
        """A session over a model loaded earlier (by this or another process): every
        layer FINALIZED, its live tensors the model's own. Re-planned from the model:
        FP8 modules report the bf16 slots they were made from, so the plan, the pieces
        and the quantization config are those of the original load (``replan``: the
        load's own pieces and handlers, from its report)."""
        configs = {m.config for m in model.modules() if hasattr(m, "full_precision_slots")}
        if len(configs) > 1:
            raise ValueError(f"model mixes FP8 configs {configs}; cannot re-plan it")
        tensors = [t for t in model.parameters()] + [b for b in model.buffers()]
        if any(t.is_meta for t in tensors):
            raise ValueError("model still has tensors on meta; load it first")
        opaque = [name for name, module in model.named_modules()
                  if not hasattr(module, "full_precision_slots")
                  and any(p.dtype.itemsize == 1 and p.is_floating_point()
                          for p in module.parameters(recurse=False))]
        if opaque:
            raise ValueError(f"FP8 parameters in modules that do not say what feeds them "
                             f"(no full_precision_slots): {opaque[:3]}; pass the load's "
                             f"session to WeightSync instead of re-planning")
        device = tensors[0].device if tensors else default_device()
        replan = replan or Replan(weakref.ref(model), None, ())
        session = cls(model, quant=next(iter(configs), None), device=device, trace=trace,
                      pieces=replan.pieces,
                      handlers=dict.fromkeys((*replan.handlers, *installers(model))))
        for rec in session.plan.layers.values():
            rec.state = LayerState.FINALIZED      # initial state of a live layer
            rec.final_bytes = sum(nbytes(t) for t in rec.handler.live_tensors(rec).values())
            session.ledger.add_final(rec.final_bytes)
        return session

    def _build_handlers(self, extra: Sequence[str]) -> list[Handler]:
        quant = ["fp8", "engine_fp8"] if self.quant is not None else []
        names = [*extra, "kv_scales", *quant, "passthrough"]
        return [HANDLERS[name](self) for name in names]

    # -- L2: match the plan against headers --------------------------------------
    def match(self, entries: dict[str, TensorEntry], index: dict[str, str]) -> list[str]:
        """Check names, shapes and dtypes; return the read order (layer by layer)."""
        self._index = index
        by_ckpt = self.plan.by_ckpt
        for name, entry in entries.items():
            rec = by_ckpt.get(name)
            if rec is not None:
                check_fits(rec, rec.pieces[name], entry.shape, entry.dtype, entry.file)
            elif name in self.plan.tied:
                canonical = self.plan.tied[name]
                if canonical not in entries:
                    self._rekey(canonical, name)
                    check_fits(by_ckpt[name], by_ckpt[name].pieces[name], entry.shape,
                               entry.dtype, entry.file)
            else:
                self.unexpected.append(name)
        if self.unexpected and self.strict:
            raise self._unexpected()
        missing: dict[str, list[str]] = {}
        for name in [n for n in by_ckpt if n not in entries]:
            rec = by_ckpt[name]
            if rec.pieces[name].optional:
                rec.missing.discard(name)
                rec.defaulted.append(name)
            else:
                missing.setdefault(rec.name, []).append(name)
        missing = self._absent = {layer: sorted(names) for layer, names in missing.items()}
        if missing and self.strict:
            raise IncompleteLoadError.listing(missing, self._index)
        # Layers that cannot complete are not read: they stay META, nothing half-loaded.
        return [name for rec in self.plan.layers.values() if rec.name not in missing
                for name in rec.pieces if name in entries]

    def _rekey(self, canonical: str, alias: str) -> None:
        """Feed a tied tensor from its alias's checkpoint name (``lm_head.weight``)."""
        rec = self.plan.by_ckpt.pop(canonical)
        rec.pieces[alias] = replace(rec.pieces.pop(canonical), ckpt_name=alias)
        rec.missing.discard(canonical)
        rec.missing.add(alias)
        self.plan.by_ckpt[alias] = rec
        self._tied_used[canonical] = alias
        self.tracer.event("tied_weight", alias=alias, canonical=canonical, source="alias")

    # -- L3/L4/L5: arrivals --------------------------------------------------------
    def arrive(self, name: str, tensor: torch.Tensor) -> None:
        """Route one checkpoint tensor to its layer. O(1) bookkeeping per call."""
        rec = self.plan.by_ckpt.get(name)
        if rec is None:
            rec = self._route_unplanned(name)
            if rec is None:
                return
        piece = rec.pieces[name]
        self._check_due(rec, (name,), name)
        check_fits(rec, piece, tensor.shape, tensor.dtype, self.file_of(name))
        self._fill(rec, piece, tensor, (name,), piece=name, shard=piece.shard,
                   expert=piece.expert)

    def arrive_param(self, rec: LayerRecord, param: str, tensor: torch.Tensor,
                     names: tuple[str, ...]) -> None:
        """One tensor for the whole of ``param`` (a trainer's own parameter name).

        It covers every piece in ``names`` (the pieces of ``param``), fused shards included.
        """
        self._check_due(rec, names, param)
        whole = Piece(param, param)
        check_fits(rec, whole, tensor.shape, tensor.dtype, None)
        self._fill(rec, whole, tensor, names, piece=param)

    def _check_due(self, rec: LayerRecord, names: tuple[str, ...], label: str) -> None:
        """Each piece arrives once: a piece no longer due is a duplicate."""
        if any(name not in rec.missing for name in names):
            raise DuplicateWeightError("piece arrived twice", tensor=label,
                                       file=self.file_of(label), layer=rec.name)

    def _fill(self, rec: LayerRecord, into: Piece, tensor: torch.Tensor,
              names: tuple[str, ...], **extra) -> None:
        if rec.state is LayerState.META:
            if self._can_alias(rec, into, tensor, names):
                self._materialize(rec, alias=tensor)
            else:
                self._materialize(rec)
        if rec.aliased:
            written = tensor
        else:
            target = rec.staging[rec.slot_attr(into.param)]
            written = target[into.region] if into.region else target
            # non_blocking: a pinned source buffer overlaps the copy with the next read.
            written.copy_(tensor, non_blocking=True)
            del target
        self._arrived(rec, names, [written], nbytes(tensor), **extra)

    def _arrived(self, rec: LayerRecord, names: tuple[str, ...], written: list[torch.Tensor],
                 nbytes_in: int, **extra) -> None:
        """Pieces ``names`` are in ``rec``'s staging (``written`` views): fire the arrival;
        the last piece completes and quantizes the layer, held until verified (L5)."""
        src, dst = rec.fire("arrive")
        for view in written:
            if view.is_floating_point() and view.numel():   # an empty max|x| raises
                # NaN/Inf check without a device sync: max|x| is NaN or Inf iff x holds one.
                rec.norms.append((names, torch.linalg.vector_norm(view, ord=float("inf"))))
        del written
        rec.missing.difference_update(names)
        self._bytes_read += nbytes_in
        self.arrivals += 1
        self._transition(rec, src, dst, "arrive", **extra)
        if not rec.missing:
            self._complete(rec, "complete")

    def _can_alias(self, rec: LayerRecord, into: Piece, tensor: torch.Tensor,
                   names: tuple[str, ...]) -> bool:
        """A reload whose one tensor is the whole one-slot layer, already on the device in
        the slot's dtype, needs no staging copy when the handler makes new tensors of it
        (FP8): those are held and committed, never the caller's tensor itself."""
        if (not rec.reloading or not rec.handler.makes_new_tensors or into.region
                or len(rec.slots) != 1 or len(names) != len(rec.missing)):
            return False
        slot = next(iter(rec.slots.values()))
        return (tensor.device == self.device and tensor.dtype == slot.dtype
                and tensor.shape == slot.shape and tensor.is_contiguous())

    def _route_unplanned(self, name: str) -> LayerRecord | None:
        """A name the plan does not know: a tied alias, or unexpected."""
        canonical = self.plan.tied.get(name)
        if canonical is not None:
            rec = self.plan.by_ckpt.get(canonical)
            if rec is not None and canonical in rec.missing:
                self._rekey(canonical, name)
                return rec
            self.tracer.event("tied_weight", alias=name, canonical=canonical, skipped=True)
            return None
        if name in self._tied_used:          # canonical after its alias fed the tensor
            self.tracer.event("tied_weight", alias=self._tied_used[name], canonical=name,
                              skipped=True)
            return None
        self.unexpected.append(name)
        if self.strict:
            raise self._unexpected()
        return None

    def _materialize(self, rec: LayerRecord, alias: torch.Tensor | None = None) -> None:
        if alias is not None:
            rec.staging, rec.aliased = {next(iter(rec.slots)): alias}, True
        else:
            rec.staging, rec.aliased = rec.handler.materialize(rec), False
        rec.staging_bytes = 0 if rec.aliased else sum(nbytes(t) for t in rec.staging.values())
        self.ledger.add_staging(rec.staging_bytes)
        self._largest = max(self._largest, rec.staging_bytes)
        self.in_flight[rec.name] = rec
        self._peak_in_flight = max(self._peak_in_flight, len(self.in_flight))
        if len(self.in_flight) > self.max_in_flight and not self._warned_in_flight:
            self._warned_in_flight = True
            self.tracer.warning(
                "layers_in_flight", count=len(self.in_flight), limit=self.max_in_flight,
                layers=list(self.in_flight),
                staging_mb=round(self.ledger.staging / 2**20, 2))
        padded = [slot.full_name for slot in rec.slots.values() if slot.padded]
        if padded and not rec.reloading:
            self.tracer.event("layer_padded", layer=rec.name, tensors=padded)
        if rec.defaulted:
            self._default(rec, rec.defaulted)

    def _default(self, rec: LayerRecord, names: list[str]) -> None:
        """Let the handler fill absent optional pieces; the trace names them."""
        rec.handler.defaults(rec, [rec.pieces[n] for n in names])
        if not rec.reloading:
            self.tracer.event("layer_defaulted", layer=rec.name, pieces=list(names))

    def _complete(self, rec: LayerRecord, trigger: str) -> None:
        src, dst = rec.fire(trigger)
        self._transition(rec, src, dst, trigger)
        with layer_range(rec.name, "quantize"):
            self.quantize(rec)
        self.held.append(rec)             # installed or committed once verified (L5)
        self._held_bytes += rec.final_bytes
        if not self.hold_all and self._held_bytes >= self.commit_bytes:
            self.commit_held()

    def commit_held(self) -> None:
        """Verify the held results (one device sync), then install (first load) or
        commit them in place (reload), layer by layer.

        A layer holding NaN/Inf raises ``NonFiniteWeightError``; the held layers stay
        QUANTIZED (for ``fail`` or the push's rollback), so no live tensor saw the bad
        values. Layers not finalized when an exception leaves stay held.
        """
        self.verify(self.held)
        held, self.held, self._held_bytes = self.held, [], 0
        try:
            for rec in held:
                with layer_range(rec.name, "commit"):
                    self.finalize(rec)
        finally:
            self.held = [rec for rec in held if rec.state is LayerState.QUANTIZED]

    def verify(self, recs) -> None:
        """Raise ``NonFiniteWeightError`` naming the first piece of ``recs`` with NaN/Inf;
        warn ``fp8_underflow`` for each tensor that FP8 flushed mostly to zero.

        The per-piece max|x| recorded at arrival and the underflow counts recorded at
        quantization are read together: one device sync.
        """
        recs = [rec for rec in recs if rec.norms or rec.underflow]
        if not recs:
            return
        values = [norm.double() for rec in recs for _, norm in rec.norms]
        values += [count.double() for rec in recs for _, *counts in rec.underflow
                   for count in counts]
        host = iter(torch.stack(values).tolist())
        for rec in recs:
            for names, _ in rec.norms:
                if not math.isfinite(next(host)):
                    raise NonFiniteWeightError("weight holds NaN or Inf", tensor=names[0],
                                               file=self.file_of(names[0]), layer=rec.name)
        for rec in recs:
            for tensor, _, _ in rec.underflow:
                flushed, nonzero = next(host), next(host)
                if nonzero and flushed / nonzero > UNDERFLOW_WARN_FRACTION:
                    self.tracer.warning("fp8_underflow", tensor=tensor, layer=rec.name,
                                        flushed=int(flushed), nonzero=int(nonzero),
                                        fraction=round(flushed / nonzero, 6))
            rec.norms.clear()
            rec.underflow.clear()

    def complete_with_defaults(self, rec: LayerRecord) -> None:
        """L6: complete a layer whose pieces still due are all optional, with defaults."""
        if rec.missing:
            absent = sorted(rec.missing)
            rec.defaulted.extend(absent)
            rec.missing.clear()
            if rec.state is LayerState.PARTIAL:
                self._default(rec, absent)
        if rec.state is LayerState.META:
            self._materialize(rec)        # applies every default of the layer
        self._complete(rec, "default")

    # -- engine hook: the engine's own weight_loader writes the pieces ----------------
    def __enter__(self) -> "LoadSession":
        """Route the model's ``weight_loader`` calls into this session (the engine hook,
        ``loadfsm.integrations.engine``): ``with LoadSession(m) as s: m.load_weights(w)``."""
        from .integrations.engine import EngineHook
        if self._hook is not None:
            raise RuntimeError("this LoadSession is already entered")
        self._hook = EngineHook(self).install()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Give every loader back exactly; on a clean exit finish, keeping ``self.report``.

        Held layers are installed before the loaders are given back, so the engine's
        attributes reach the installed parameters (E5)."""
        hook, self._hook = self._hook, None
        try:
            if exc_type is None:
                self.commit_held()
        except BaseException as err:
            hook.restore()
            self.fail(err)
            raise
        hook.restore()
        if exc_type is not None:
            self.fail(exc)
            return
        try:
            self.report = self.finish()
        except BaseException as err:
            self.fail(err)
            raise

    def stage(self, rec: LayerRecord) -> dict[str, torch.Tensor]:
        """L3 for a caller that writes pieces itself: ``rec``'s staging, materialized at
        its first piece. Report each written piece with ``arrive_in_place``."""
        if rec.state is LayerState.META and not rec.staging:
            self._materialize(rec)
        return rec.staging

    def arrive_in_place(self, rec: LayerRecord, names: tuple[str, ...], nbytes: int,
                        **extra) -> None:
        """Pieces ``names`` were written into ``rec``'s staging by the caller: fire the
        arrival; the last piece completes and quantizes the layer, held until verified."""
        self._check_due(rec, names, names[0])
        written = []
        for name in names:
            piece = rec.pieces[name]
            target = rec.staging[rec.slot_attr(piece.param)]
            written.append(target[piece.region] if piece.region else target)
        self._arrived(rec, names, written, nbytes, **extra)

    def fail(self, exc: BaseException) -> None:
        """A first load that raised: trace ``load_failed``, then drop the staging of every
        layer in flight and the unverified results of every held layer (back to META).
        Nothing unverified was installed: finalized layers hold verified tensors, the
        others keep their ``meta`` parameters."""
        with deferred_interrupts():
            for rec in [*self.in_flight.values(), *self.held]:
                self.ledger.free_staging(rec.staging_bytes)
                if rec.results:
                    self.ledger.free_final(rec.final_bytes)
                rec.staging, rec.results, rec.staging_bytes = {}, {}, 0
                rec.norms.clear()
                rec.underflow.clear()
                if rec.state is not LayerState.META:
                    src, dst = rec.fire("abandon")
                    self._transition(rec, src, dst, "abandon")
            self.in_flight.clear()
            self.held, self._held_bytes = [], 0
            self.tracer.event("load_failed", **failure(exc))
            self.tracer.close()

    # -- reload (RL weight sync) ----------------------------------------------------
    def reload(self, rec: LayerRecord) -> None:
        """FINALIZED -> META: expect every piece again; the live kernel tensors stay put."""
        src, dst = rec.fire("reload")
        rec.reloading = True
        rec.missing = set(rec.pieces)
        rec.defaulted = []
        self._transition(rec, src, dst, "reload")

    def rollback(self, rec: LayerRecord) -> None:
        """A reload that cannot finish: free its staging and results, keep the live tensors.
        Whole under held SIGINT: a second Ctrl-C lands after the layer is FINALIZED."""
        with deferred_interrupts():
            self.ledger.free_staging(rec.staging_bytes
                                     + (rec.final_bytes if rec.results else 0))
            rec.staging, rec.results, rec.staging_bytes = {}, {}, 0
            rec.norms.clear()
            rec.underflow.clear()
            rec.missing.clear()
            rec.reloading = False
            self.in_flight.pop(rec.name, None)
            src, dst = rec.fire("rollback")
            self._transition(rec, src, dst, "rollback")

    def quantize(self, rec: LayerRecord) -> None:
        """L4: quantize a COMPLETE layer, then free its staging."""
        results = rec.handler.quantize(rec)
        staging_ids = {id(t) for t in rec.staging.values()}
        if rec.aliased:      # the pushed tensor is the caller's, never counted as ours
            owned = [t for t in results.values() if id(t) not in staging_ids]
            shared, produced = 0, sum(nbytes(t) for t in owned)
        else:
            shared = sum(nbytes(t) for t in results.values() if id(t) in staging_ids)
            produced = sum(nbytes(t) for t in results.values())
        if rec.reloading:
            self.ledger.add_staging(produced - shared)   # held until copied into live tensors
        else:
            self.ledger.free_staging(shared)
            self.ledger.add_final(produced)
        self.ledger.free_staging(rec.staging_bytes - shared)
        if not rec.reloading:
            self._count_underflow(rec, results)
        rec.results, rec.staging, rec.staging_bytes = results, {}, 0
        rec.final_bytes = produced
        self._largest_output = max(self._largest_output, produced)
        self.in_flight.pop(rec.name, None)
        src, dst = rec.fire("quantize")
        self._transition(rec, src, dst, "quantize")

    def _count_underflow(self, rec: LayerRecord, results: dict[str, torch.Tensor]) -> None:
        """Record, per FP8 result, how many nonzero inputs it flushed to zero (checked with
        the NaN/Inf batch). Counted on an evenly spread sample of rows: the warning needs a
        fraction, not an exact count, and a full pass over every weight cost a quarter of
        an H200 load (BENCHMARKS.md). First loads only: a push is the RL hot path, and its
        weights come from the distribution the first load already checked."""
        for attr, q in results.items():
            w = rec.staging.get(attr)
            if (w is not None and q is not w and q.is_floating_point() and q.dtype.itemsize == 1
                    and w.is_floating_point() and w.dtype.itemsize > 1):
                rows = sample_rows(w, q, UNDERFLOW_SAMPLE)
                if rows is not None:
                    rec.underflow.append((rec.slots[attr].full_name, *flushed_to_zero(*rows)))

    def finalize(self, rec: LayerRecord) -> None:
        """L5: install (first load) or commit in place (reload) the kernel tensors.

        The tensors and the record change together under held SIGINT: a Ctrl-C lands
        after the layer is wholly new and FINALIZED (an exception from the handler
        leaves it wholly old and QUANTIZED)."""
        with deferred_interrupts():
            if rec.reloading:
                rec.handler.commit(rec)
                self.ledger.free_staging(rec.final_bytes)
                rec.reloading = False
                self.committed.append(rec.name)
            else:
                rec.handler.install(rec)
            rec.results = {}
            src, dst = rec.fire("finalize")
            self._transition(rec, src, dst, "finalize")
        if self.on_layer_done is not None:
            self.on_layer_done(rec)

    def _transition(self, rec: LayerRecord, src, dst, trigger: str, **extra) -> None:
        if self.tracer.enabled:
            self.tracer.transition(rec.name, src.name, dst.name, trigger,
                                   rec.staging_bytes + rec.final_bytes,
                                   ledger_staging=self.ledger.staging,
                                   ledger_final=self.ledger.final, **extra)

    # -- placing tensors into the model -------------------------------------------
    def place(self, rec: LayerRecord, attr: str, tensor: torch.Tensor) -> None:
        """Set a loaded tensor on its module and on every module tied to it."""
        slot = rec.slots[attr]
        if slot.is_buffer:
            value = tensor
        else:
            old = rec.module._parameters.get(attr)
            grad = bool(old is not None and old.requires_grad and tensor.is_floating_point())
            value = nn.Parameter(tensor, requires_grad=grad)
        for full in [slot.full_name, *slot.aliases]:
            owner, _, name = full.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            if slot.is_buffer:
                module._buffers[name] = value
            else:
                setattr(module, name, value)

    def replace_module(self, rec: LayerRecord, new: nn.Module) -> None:
        """Swap a layer's module for its kernel form (an FP8 linear, say), under every
        name it is registered at."""
        for name in rec.names or [rec.name]:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, new)
        rec.module = new

    # -- L6: finalize sweep ---------------------------------------------------------
    def finish(self) -> LoadReport:
        """Default what may be defaulted, compute buffers, enforce strictness, report."""
        for rec in self.plan.layers.values():
            if rec.state in _DONE or rec.required_missing():     # held or installed
                continue
            self.complete_with_defaults(rec)
        self.commit_held()
        self._compute_buffers()
        missing = self._missing()
        for name in missing:                  # incomplete layers keep no staging
            rec = self.plan.layers[name]
            self.ledger.free_staging(rec.staging_bytes)
            rec.staging, rec.staging_bytes = {}, 0
            self.in_flight.pop(name, None)
        report = self.build_report(missing)
        report.replan = self.replan   # for WeightSync(model, session=report); not a field
        if missing:
            self.tracer.warning("load_incomplete", missing=missing)
        if self.unexpected:
            self.tracer.warning("unexpected_weights", names=sorted(self.unexpected))
        if missing and self.strict:
            raise IncompleteLoadError.listing(missing, self._index)
        self.tracer.event("load_complete", **{k: v for k, v in report.to_dict().items()
                                              if k != "layer_states"})
        self.tracer.close()
        return report

    def _compute_buffers(self) -> None:
        for module in self.model.modules():
            compute = buffer_init(module)
            if compute is not None and any(b is not None and b.is_meta
                                         for b in module._buffers.values()):
                compute(self.device)

    def _missing(self) -> dict[str, list[str]]:
        """Per layer, the required names that did not arrive (or that the checkpoint lacks)."""
        return {rec.name: self._absent.get(rec.name) or rec.required_missing()
                for rec in self.plan.layers.values() if rec.required_missing()}

    def _unexpected(self) -> UnexpectedWeightError:
        return UnexpectedWeightError.listing(self.unexpected, self.file_of(min(self.unexpected)))

    # -- report ------------------------------------------------------------------------
    def _cuda_reset(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def build_report(self, missing: dict[str, list[str]] | None = None) -> LoadReport:
        cuda_peak = None
        if self._cuda_base is not None:
            torch.cuda.synchronize(self.device)
            cuda_peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_base
        layer_states = {name: rec.state.name for name, rec in self.plan.layers.items()}
        states = {state.name: 0 for state in LayerState}
        for state in layer_states.values():
            states[state] += 1
        return LoadReport(
            peak_bytes=self.ledger.peak, final_bytes=self.ledger.final,
            largest_layer_bytes=self._largest, largest_output_bytes=self._largest_output,
            seconds=time.perf_counter() - self._t0,
            states=states, layer_states=layer_states, device=str(self.device),
            quant=quant_name(self.quant),
            bytes_read=self._bytes_read, cuda_peak_bytes=cuda_peak,
            max_layers_in_flight=self._peak_in_flight,
            missing=missing if missing is not None else self._missing(),
            unexpected=sorted(self.unexpected),
            defaulted=[r.name for r in self.plan.layers.values() if r.defaulted],
            padded=[s.full_name for r in self.plan.layers.values()
                    for s in r.slots.values() if s.padded],
            tied={alias: canonical for canonical, slot in self._slots_with_aliases()
                  for alias in slot.aliases})

    def _slots_with_aliases(self):
        for rec in self.plan.layers.values():
            for slot in rec.slots.values():
                if slot.aliases:
                    yield slot.full_name, slot
