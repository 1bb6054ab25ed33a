"""The arrival driver: arrive -> complete -> quantize, for one layer at a time.

A layer's first piece materializes its staging (META -> PARTIAL); each piece is copied
in and its max|x| recorded (``finiteness``); the last piece completes the layer, its
handler quantizes it and the staging is freed at once (COMPLETE -> QUANTIZED). What
happens to a quantized layer then is the caller's policy (``on_quantized``): a load
holds it for verification and installs it, a reload holds it and commits it in place.
Lifecycle and memory bound: ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import DuplicateWeightError, UnexpectedWeightError
from ..layer import LayerRecord
from ..ledger import MemoryLedger, nbytes
from ..pieces import Piece
from ..plan import Plan, check_fits
from ..profiling import layer_range
from ..states import LayerState
from ..trace import Tracer
from .finiteness import FinitenessBatch, locatable, scale_checked
from .landing import PieceLayout, layout_of, piece_view
from .warmup import KernelWarmup

_PARTIAL = LayerState.PARTIAL
# A plain layer whose pushed tensor is at least this large commits it straight from the
# trainer's memory (no staging copy: 2 bytes moved per byte saved) at the cost of one
# device sync; below it the copy is cheaper than the sync.
BORROW_MIN_BYTES = 256 << 20


def indexed(device: torch.device) -> torch.device:
    """``cuda`` means the current GPU; made explicit, it compares equal to the ``cuda:N``
    every tensor reports (a tensor's ``device == torch.device("cuda")`` is never true)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class ArrivalDriver:
    """Routes arriving tensors into their layers' staging and fires the layer machine.

    ``reloading`` is set by a reload transaction for the length of a push: staging may
    alias a pushed tensor, results are counted as extra bytes until committed, and the
    first-load-only trace events and underflow counts are skipped. ``borrowing`` (a push
    that commits layer by layer) lets a plain layer keep a large pushed tensor as its
    staging, committed before the next tensor is asked for. ``owned_arrivals`` is set by
    a load whose source hands its device tensors over (``Source.owned_arrivals``).
    """

    def __init__(self, plan: Plan, *, device: torch.device, config, ledger: MemoryLedger,
                 tracer: Tracer, strict: bool, max_in_flight: int,
                 on_quantized: Callable[[LayerRecord], None]):
        self.plan, self.device, self.config = plan, indexed(device), config
        self.ledger, self.tracer, self.strict = ledger, tracer, strict
        self.max_in_flight = max_in_flight
        self.on_quantized = on_quantized
        self.reloading = False
        self.owned_arrivals = False
        self.borrowing = False
        self.warmup: KernelWarmup | None = None     # kernels readied meanwhile (warmup)
        self.file_of: Callable[[str], str | None] = lambda name: None
        self.in_flight: dict[str, LayerRecord] = {}
        self.unexpected: list[str] = []
        self.bytes_read = 0
        self.arrivals = 0             # pieces arrived; the watchdog polls it
        self.largest = 0
        self.largest_output = 0
        self.peak_in_flight = 0
        self._warned_in_flight = False
        self._layouts: dict[str, PieceLayout] = {}     # ckpt name -> where it lands
        self._wholes: dict[str, Piece] = {}            # parameter -> the piece of all of it
        self._by_scale: dict[str, dict[str, int]] = {}  # layer -> weights its scales check

    # -- arrivals --------------------------------------------------------------------
    def arrive(self, name: str, tensor: torch.Tensor) -> None:
        """Route one checkpoint tensor to its layer. O(1) bookkeeping per call."""
        rec = self.plan.by_ckpt.get(name)
        if rec is None:
            rec = self._route_unplanned(name)
            if rec is None:
                return
        self.arrive_piece(rec, name, tensor)

    def arrive_piece(self, rec: LayerRecord, name: str, tensor: torch.Tensor) -> None:
        """Checkpoint tensor ``name`` of ``rec`` (routed by the caller): L3, then L4 if it
        was the last piece. The hot path of loads and pushes: a few dict lookups, one
        view and one copy; no allocation, no trace work with tracing off, no per-piece
        kernel besides the copy (the NaN/Inf check runs per layer, ``finiteness``)."""
        layout = self._layouts.get(name)
        if layout is None:
            layout = self._layout(rec, name)
        if name not in rec.missing:
            self._check_due(rec, (name,), name)
        if tensor.shape != layout.shape or tensor.dtype != layout.dtype:
            check_fits(rec, rec.pieces[name], tensor.shape, tensor.dtype, self.file_of(name))
        state = rec.state
        if state is LayerState.META:
            piece = rec.pieces[name]
            self._materialize(rec, alias=tensor if self._can_alias(rec, piece, tensor, (name,))
                              else None)
        if not rec.aliased:
            view = piece_view(rec.staging[layout.attr], rec.pieces[name].region, layout)
            # non_blocking: a pinned source buffer overlaps the copy with the next read.
            view.copy_(tensor, non_blocking=True)
            if not layout.locatable:
                FinitenessBatch.record_norm(rec, (name,), view)
            del view
            if self.owned_arrivals and tensor.device == self.device:
                # Handed over and copied: its memory goes back now, not after the layer
                # quantizes (the caller holds the tensor object until arrive returns).
                tensor.untyped_storage().resize_(0)
        if layout.locatable:
            rec.arrived.append(name)
        rec.missing.discard(name)
        self.bytes_read += tensor.nbytes
        self.arrivals += 1
        if state is not _PARTIAL or self.tracer.enabled:
            # PARTIAL -> PARTIAL is a self-loop: with no trace sink, firing it changes
            # nothing, so only the first arrival and traced ones go through the machine.
            src, dst = rec.fire("arrive")
            if self.tracer.enabled:
                piece = rec.pieces[name]
                self.transition(rec, src, dst, "arrive", piece=name, shard=piece.shard,
                                expert=piece.expert)
        if not rec.missing:
            self._complete(rec, "complete")

    def _layout(self, rec: LayerRecord, name: str) -> PieceLayout:
        layout = self._layouts[name] = layout_of(rec, name)
        return layout

    def arrive_param(self, rec: LayerRecord, param: str, tensor: torch.Tensor,
                     names: tuple[str, ...]) -> None:
        """One tensor for the whole of ``param`` (a trainer's own parameter name),
        covering every piece in ``names``, fused shards included."""
        self._check_due(rec, names, param)
        whole = self._wholes.get(param)
        if whole is None:
            whole = self._wholes[param] = Piece(param, param)
        check_fits(rec, whole, tensor.shape, tensor.dtype, None)
        if rec.state is LayerState.META:
            self._materialize(rec, alias=tensor if self._can_alias(rec, whole, tensor, names)
                              else None)
        if not rec.aliased:
            rec.staging[rec.slot_attr(param)].copy_(tensor, non_blocking=True)
        rec.arrived.append(names)     # whole rows of the parameter: the layer check covers it
        self._arrived(rec, names, nbytes(tensor), piece=param)

    def stage(self, rec: LayerRecord) -> dict[str, torch.Tensor]:
        """For a caller that writes pieces itself (the engine hook): ``rec``'s staging,
        materialized at its first piece. Report each written piece with
        ``arrive_in_place``."""
        if rec.state is LayerState.META and not rec.staging:
            self._materialize(rec)
        return rec.staging

    def arrive_in_place(self, rec: LayerRecord, names: tuple[str, ...], nbytes_in: int,
                        **extra) -> None:
        """Pieces ``names`` were written into ``rec``'s staging by the caller."""
        self._check_due(rec, names, names[0])
        if all(locatable(rec, rec.pieces[name]) for name in names):
            rec.arrived.append(names)
        else:
            for name in names:
                piece = rec.pieces[name]
                target = rec.staging[rec.slot_attr(piece.param)]
                FinitenessBatch.record_norm(rec, names,
                                            target[piece.region] if piece.region else target)
        self._arrived(rec, names, nbytes_in, **extra)

    def complete_with_defaults(self, rec: LayerRecord) -> None:
        """Complete a layer whose pieces still due are all optional, with defaults."""
        if rec.missing:
            absent = sorted(rec.missing)
            rec.defaulted.extend(absent)
            rec.missing.clear()
            if rec.state is LayerState.PARTIAL:
                self._default(rec, absent)
        if rec.state is LayerState.META:
            self._materialize(rec)        # applies every default of the layer
        self._complete(rec, "default")

    def _check_due(self, rec: LayerRecord, names: tuple[str, ...], label: str) -> None:
        """Each piece arrives once: a piece no longer due is a duplicate."""
        if any(name not in rec.missing for name in names):
            raise DuplicateWeightError("piece arrived twice", tensor=label,
                                       file=self.file_of(label), layer=rec.name)

    def _arrived(self, rec: LayerRecord, names: tuple[str, ...], nbytes_in: int,
                 **extra) -> None:
        src, dst = rec.fire("arrive")
        rec.missing.difference_update(names)
        self.bytes_read += nbytes_in
        self.arrivals += 1
        self.transition(rec, src, dst, "arrive", **extra)
        if not rec.missing:
            self._complete(rec, "complete")

    def _can_alias(self, rec: LayerRecord, into: Piece, tensor: torch.Tensor,
                   names: tuple[str, ...]) -> bool:
        """Whether ``tensor``, the whole of a one-slot layer already on the device in the
        slot's dtype, can be the layer's staging instead of being copied into one: in a
        reload when the handler makes new tensors of it (FP8: those are held and
        committed, never the caller's tensor itself) or, ``borrowing``, when it is large
        enough that a copy costs more than committing the layer at once (the session
        does, before the caller's iterator moves on); in a load when the source handed
        the tensor over (``owned_arrivals``: it is the session's to keep)."""
        if into.region or len(rec.slots) != 1 or len(names) != len(rec.missing):
            return False
        if self.reloading:
            if not (rec.handler.makes_new_tensors
                    or (self.borrowing and nbytes(tensor) >= BORROW_MIN_BYTES)):
                return False
        elif not self.owned_arrivals:
            return False
        slot = next(iter(rec.slots.values()))
        return (tensor.device == self.device and tensor.dtype == slot.dtype
                and tensor.shape == slot.shape and tensor.is_contiguous())

    def borrowed(self, rec: LayerRecord) -> bool:
        """Whether ``rec``'s results are a pushed tensor itself (``borrowing``)."""
        return rec.aliased and self.reloading and not rec.handler.makes_new_tensors

    def _route_unplanned(self, name: str) -> LayerRecord | None:
        """A name the plan does not know: a tied alias, or unexpected."""
        canonical = self.plan.tied.get(name)
        if canonical is not None:
            rec = self.plan.by_ckpt.get(canonical)
            if rec is not None and canonical in rec.missing:
                rec = self.plan.rekey(canonical, name)
                self.tracer.event("tied_weight", alias=name, canonical=canonical,
                                  source="alias")
                return rec
            self.tracer.event("tied_weight", alias=name, canonical=canonical, skipped=True)
            return None
        if name in self.plan.tied_used:          # canonical after its alias fed the tensor
            self.tracer.event("tied_weight", alias=self.plan.tied_used[name], canonical=name,
                              skipped=True)
            return None
        self.unexpected.append(name)
        if self.strict:
            raise self.unexpected_error()
        return None

    def unexpected_error(self) -> UnexpectedWeightError:
        return UnexpectedWeightError.listing(self.unexpected, self.file_of(min(self.unexpected)))

    # -- META -> PARTIAL -> COMPLETE -> QUANTIZED --------------------------------------
    def _materialize(self, rec: LayerRecord, alias: torch.Tensor | None = None) -> None:
        if alias is not None:
            rec.staging, rec.aliased = {next(iter(rec.slots)): alias}, True
        else:
            rec.staging, rec.aliased = rec.handler.materialize(rec, self.device), False
        # A pushed tensor aliased in a reload is the trainer's memory; a handed-over
        # one in a load is the layer's own, counted like staging.
        rec.staging_bytes = (0 if rec.aliased and self.reloading
                             else sum(nbytes(t) for t in rec.staging.values()))
        self.ledger.add_staging(rec.staging_bytes)
        self.largest = max(self.largest, rec.staging_bytes)
        self.in_flight[rec.name] = rec
        self.peak_in_flight = max(self.peak_in_flight, len(self.in_flight))
        if len(self.in_flight) > self.max_in_flight and not self._warned_in_flight:
            self._warned_in_flight = True
            self.tracer.warning(
                "layers_in_flight", count=len(self.in_flight), limit=self.max_in_flight,
                layers=list(self.in_flight),
                staging_mb=round(self.ledger.staging / 2**20, 2))
        if not self.reloading:
            padded = [slot.full_name for slot in rec.slots.values() if slot.padded]
            if padded:
                self.tracer.event("layer_padded", layer=rec.name, tensors=padded)
        if rec.defaulted:
            self._default(rec, rec.defaulted)

    def _default(self, rec: LayerRecord, names: list[str]) -> None:
        """Let the handler fill absent optional pieces; the trace names them."""
        rec.handler.defaults(rec, [rec.pieces[n] for n in names])
        if not self.reloading:
            self.tracer.event("layer_defaulted", layer=rec.name, pieces=list(names))

    def _complete(self, rec: LayerRecord, trigger: str) -> None:
        by_scale = self._by_scale.get(rec.name)
        if by_scale is None:
            by_scale = self._by_scale[rec.name] = scale_checked(rec, self.config)
        by_scale = FinitenessBatch.record_layer(rec, by_scale)
        src, dst = rec.fire(trigger)
        self.transition(rec, src, dst, trigger)
        warmup = self.warmup
        if warmup is not None and (self.reloading or warmup.done()):
            warmup.wait()       # a push runs again and again: it waits for the kernels
            self.warmup = warmup = None
        with layer_range(rec.name, "quantize"):
            if warmup is None:
                self._quantize(rec, by_scale)
            else:
                with rec.handler.unprepared():
                    self._quantize(rec, by_scale)
        self.on_quantized(rec)

    def _quantize(self, rec: LayerRecord, by_scale: dict[str, int]) -> None:
        """Quantize a COMPLETE layer, then free its staging."""
        results = rec.handler.quantize(rec, self.config)
        FinitenessBatch.record_scales(rec, results, by_scale)
        staging_ids = {id(t) for t in rec.staging.values()}
        owned = shared = 0
        for t in results.values():
            if id(t) in staging_ids:
                shared += nbytes(t)
            else:
                owned += nbytes(t)
        if rec.aliased and self.reloading:    # the pushed tensor is the caller's, not ours
            shared, produced = 0, owned
        else:
            produced = owned + shared
        if self.reloading:
            self.ledger.add_staging(produced - shared)   # held until copied into live tensors
        else:
            self.ledger.free_staging(shared)
            self.ledger.add_final(produced)
            FinitenessBatch.record_underflow(rec, results)   # first loads only: see finiteness
        self.ledger.free_staging(rec.staging_bytes - shared)
        rec.results, rec.staging, rec.staging_bytes = results, {}, 0
        rec.final_bytes = produced
        self.largest_output = max(self.largest_output, produced)
        self.in_flight.pop(rec.name, None)
        src, dst = rec.fire("quantize")
        self.transition(rec, src, dst, "quantize")

    def drop(self, rec: LayerRecord) -> None:
        """Free ``rec``'s staging, results and pending checks (a failed load or push)."""
        self.ledger.free_staging(rec.staging_bytes)
        if rec.results:
            if self.reloading:
                self.ledger.free_staging(rec.final_bytes)
            else:
                self.ledger.free_final(rec.final_bytes)
        rec.staging, rec.results, rec.staging_bytes = {}, {}, 0
        rec.norms.clear()
        rec.arrived.clear()
        rec.underflow.clear()
        self.in_flight.pop(rec.name, None)

    def transition(self, rec: LayerRecord, src, dst, trigger: str, **extra) -> None:
        if self.tracer.enabled:
            self.tracer.transition(rec.name, src.name, dst.name, trigger,
                                   rec.staging_bytes + rec.final_bytes,
                                   ledger_staging=self.ledger.staging,
                                   ledger_final=self.ledger.final, **extra)
