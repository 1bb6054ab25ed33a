"""The finiteness batch: quantized layers wait here until their inputs are proven finite.

Every value that arrives is checked: when a layer completes, one reduction per staging
tensor records a per-row value that is finite iff the row is (on the device: no sync).
That covers every piece that arrived (``rec.arrived``) with one kernel per tensor, not
one per piece: a MoE layer's hundreds of expert pieces cost one launch. A weight whose
quantization scale already says it (``Handler.scale_checked``: FP8's scale is max|w|
over its rows, NaN/Inf included) is not reduced again: its scale is the record, as
long as the scale's rows single out every piece of it. A piece that splits rows (its
region indexes the last dim) records its own max|x| as it arrives, so a bad value is
always named by the piece, never by a neighbour. Quantization records, per FP8 weight,
how many nonzero inputs it flushed to zero. Everything is read back together, one
device sync per ``commit_bytes`` of held results (or once per push with ``hold_all``),
before any held layer is installed or committed: a layer holding NaN/Inf raises
``NonFiniteWeightError`` naming the first arrival (in order) that carried it, and no
live tensor sees it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..errors import NonFiniteWeightError
from ..handlers.base import WHOLE_MATRIX
from ..layer import LayerRecord
from ..quant.fp8 import flushed_to_zero, sample_rows
from ..quant.prequantized import fp8_row_flags, is_fp8
from ..trace import Tracer

COMMIT_BYTES = 512 << 20     # bytes of held results per verification
# Warn when more than this fraction of a tensor's nonzero values become zero in FP8: a
# normal weight loses ~1e-5 of them; a scale set by a far outlier loses most.
UNDERFLOW_WARN_FRACTION = 0.01
UNDERFLOW_SAMPLE = 1 << 18    # elements of each FP8 weight counted for the underflow warning


class FinitenessBatch:
    """The held layers (QUANTIZED, not yet installed) and their pending checks."""

    def __init__(self, commit_bytes: int | None = None):
        self.held: list[LayerRecord] = []
        self.held_bytes = 0
        self.commit_bytes = COMMIT_BYTES if commit_bytes is None else commit_bytes
        self.hold_all = False         # a push with atomic="model": verify once, at the end

    def hold(self, rec: LayerRecord) -> bool:
        """Hold a quantized layer; returns whether the batch is due for verification."""
        self.held.append(rec)
        self.held_bytes += rec.final_bytes
        return not self.hold_all and self.held_bytes >= self.commit_bytes

    def take(self) -> list[LayerRecord]:
        """Every held layer, the batch emptied."""
        held, self.held, self.held_bytes = self.held, [], 0
        return held

    @staticmethod
    def record_norm(rec: LayerRecord, names: tuple[str, ...], view: torch.Tensor) -> None:
        """Note ``view``'s max|x| on the device now (a piece the layer check cannot
        single out): NaN or Inf iff it holds one."""
        if view.is_floating_point() and view.numel():     # an empty max|x| raises
            rec.norms.append(((names,), [_amax(view)], None))

    @staticmethod
    def record_layer(rec: LayerRecord, by_scale: dict[str, int]) -> dict[str, int]:
        """At completion, before quantization frees the staging: one row-wise reduction
        per staging tensor covers every arrival in ``rec.arrived`` (and the zero
        padding); the tensors in ``by_scale`` wait for their scales. Returns those
        (``record_scales`` takes them)."""
        if not rec.arrived:
            return {}
        rows = {attr: _rows(t) for attr, t in rec.staging.items()
                if t.is_floating_point() and t.numel() and attr not in by_scale}
        arrived, rec.arrived = rec.arrived, []
        rec.norms.append((arrived, list(rows.values()), rows))
        return by_scale

    @staticmethod
    def record_scales(rec: LayerRecord, results: dict[str, torch.Tensor],
                      by_scale: dict[str, int]) -> None:
        """After quantization: each weight in ``by_scale`` is checked by its scale."""
        if not by_scale:
            return
        _, values, rows = rec.norms[-1]
        for attr, block in by_scale.items():
            scale = results[f"{attr}_scale"]
            values.append(scale)
            rows[attr] = _ScaleRows(scale, block)

    @staticmethod
    def record_underflow(rec: LayerRecord, results: dict[str, torch.Tensor]) -> None:
        """Per FP8 result, how many nonzero inputs it flushed to zero, counted on an evenly
        spread sample of rows: the warning needs a fraction, not an exact count, and a
        full pass over every weight cost a quarter of an H200 load (BENCHMARKS.md)."""
        for attr, q in results.items():
            w = rec.staging.get(attr)
            if (w is not None and q is not w and q.is_floating_point() and q.dtype.itemsize == 1
                    and w.is_floating_point() and w.dtype.itemsize > 1):
                rows = sample_rows(w, q, UNDERFLOW_SAMPLE)
                if rows is not None:
                    rec.underflow.append((rec.slots[attr].full_name, *flushed_to_zero(*rows)))

    @staticmethod
    def verify(recs: Iterable[LayerRecord], tracer: Tracer,
               file_of: Callable[[str], str | None]) -> None:
        """Raise ``NonFiniteWeightError`` naming the first piece of ``recs`` with NaN/Inf;
        warn ``fp8_underflow`` for each tensor FP8 flushed mostly to zero. One sync,
        and a few launches for the whole batch (one per dtype of the records)."""
        recs = [rec for rec in recs if rec.norms or rec.underflow]
        if not recs:
            return
        values = [v for rec in recs for _, vals, _ in rec.norms for v in vals]
        checks = [_any_bad(values)] if values else []
        counts = [count for rec in recs for _, *pair in rec.underflow for count in pair]
        if counts:
            checks.append(torch.stack(counts).double())
        host = torch.cat(checks).tolist()
        if values and not math.isfinite(host[0]):
            for rec in recs:
                for arrived, vals, rows in rec.norms:
                    if not all(torch.isfinite(v).all() for v in vals):
                        names = _first_bad(rec, arrived, rows)
                        raise NonFiniteWeightError("weight holds NaN or Inf", tensor=names[0],
                                                   file=file_of(names[0]), layer=rec.name)
        counts = iter(host[1:] if values else host)
        for rec in recs:
            for tensor, _, _ in rec.underflow:
                flushed, nonzero = next(counts), next(counts)
                if nonzero and flushed / nonzero > UNDERFLOW_WARN_FRACTION:
                    tracer.warning("fp8_underflow", tensor=tensor, layer=rec.name,
                                   flushed=int(flushed), nonzero=int(nonzero),
                                   fraction=round(flushed / nonzero, 6))
            rec.norms.clear()
            rec.underflow.clear()


def scale_checked(rec: LayerRecord, config) -> dict[str, int]:
    """The weights of ``rec`` its handler's scales check (``Handler.scale_checked``),
    kept only where the scale's rows single out every piece of the weight."""
    return {attr: block for attr, block in rec.handler.scale_checked(rec, config).items()
            if _scale_locates(rec, attr, block)}


class _ScaleRows:
    """A scale standing for row maxima: finite exactly where its rows of the weight are."""

    def __init__(self, scale: torch.Tensor, block: int):
        self.scale, self.block = scale, block

    def maxima(self) -> torch.Tensor:
        """Broadcastable against the weight's leading dims and rows (the error path)."""
        if self.block > 1:
            return self.scale.repeat_interleave(self.block, dim=-2)
        return self.scale


def _scale_locates(rec: LayerRecord, attr: str, block: int) -> bool:
    slot = rec.slots[attr]
    if len(slot.shape) < 2 or not slot.dtype.is_floating_point or slot.dtype.itemsize == 1:
        return False
    lead, n = len(slot.shape) - 2, slot.shape[-2]
    for piece in rec.pieces.values():
        if rec.slot_attr(piece.param) != attr:
            continue
        region = piece.region
        if not locatable(rec, piece):
            return False
        if len(region) <= lead:
            continue                       # whole matrices
        rows = region[lead]
        if isinstance(rows, int):
            start, stop = rows % n, rows % n + 1
        elif isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(n)
        else:
            return False
        if block == WHOLE_MATRIX:
            if (start, stop) != (0, n):
                return False
        elif start % block or (stop % block and stop != n):
            return False
    return True


def _any_bad(values: list[torch.Tensor]) -> torch.Tensor:
    """One float64 value, NaN iff any element of ``values`` is NaN or Inf (``x * 0`` is 0
    for finite x): one concatenation and one sum per dtype. Row maxima and norms are 1-D
    already and per-tensor scales are stacked at once: no view per value (a push has one
    per layer)."""
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for v in values:
        flat, scalars = groups.setdefault(v.dtype, ([], []))
        if v.dim() == 1:
            flat.append(v)
        elif v.dim():
            flat.append(v.reshape(-1))
        else:
            scalars.append(v)
    sums = []
    for flat, scalars in groups.values():
        if scalars:
            flat.append(torch.stack(scalars))
        sums.append(torch.cat(flat).mul_(0).sum().double().reshape(1))
    return sums[0] if len(sums) == 1 else torch.cat(sums).sum().reshape(1)


def locatable(rec: LayerRecord, piece) -> bool:
    """Whether the layer check's row maxima single ``piece`` out: its region leaves the
    last dim whole (1-D and 0-D tensors keep every element, so any region does)."""
    return len(piece.region) < max(len(rec.slots[rec.slot_attr(piece.param)].shape), 2)


def _amax(t: torch.Tensor) -> torch.Tensor:
    if is_fp8(t.dtype):                     # a pre-quantized checkpoint's FP8 codes
        return fp8_row_flags(t.reshape(-1)).amax().double()
    # No ``dtype=``: it would cast a copy of the whole piece first; the scalar is cast.
    return torch.linalg.vector_norm(t, ord=float("inf")).double()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Per row (over the last dim), max|x|: finite iff the row is, exact for every dtype,
    and computed without a temporary the size of ``t`` (a float64 ``sum(dtype=...)``
    first makes a float64 copy: 4x a bf16 layer, above the memory bound on a GPU).
    1-D and 0-D tensors are their own record (every element, finite iff it is; no op,
    which on a GPU is a launch per norm layer): the tensor is held, unchanged, until it
    is verified. FP8 codes (a pre-quantized checkpoint's) are read from their bits
    (``quant.prequantized.fp8_row_flags``)."""
    if is_fp8(t.dtype):
        return fp8_row_flags(t)
    if t.dim() < 2:
        return t
    if t.is_cuda:       # one launch, and faster than aminmax there (BENCHMARKS.md)
        return torch.linalg.vector_norm(t, ord=math.inf, dim=-1)
    # Row min and max in one pass (NaN in both, an infinity in one): 2x faster than the
    # row inf-norm on a CPU, and nothing the size of ``t`` either.
    low, high = torch.aminmax(t, dim=-1)
    return torch.maximum(high, low.neg())


def _first_bad(rec: LayerRecord, arrived: list, rows: dict | None) -> tuple[str, ...]:
    """The first arrival in ``arrived`` whose values hold NaN/Inf (the error path: reads
    the row maxima back). An arrival is a ckpt name or a tuple of names written at once."""
    if rows is None:
        return arrived[0]
    for entry in arrived:
        names = (entry,) if isinstance(entry, str) else entry
        for name in names:
            piece = rec.pieces[name]
            maxima = rows.get(rec.slot_attr(piece.param))
            if isinstance(maxima, _ScaleRows):
                maxima = maxima.maxima()
            # A region that splits rows is only logged as part of a whole-parameter
            # arrival, which wrote those whole rows: its rows single the arrival out.
            if maxima is not None and not torch.isfinite(
                    maxima[piece.region[:maxima.dim()]]).all():
                return names
    first = arrived[0]            # NaN/Inf outside every arrival: padding or a default
    return (first,) if isinstance(first, str) else first
