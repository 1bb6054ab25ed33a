"""The finiteness batch: quantized layers wait here until their inputs are proven finite.

Every value that arrives is checked: when a layer completes, one reduction per staging
tensor records a per-row value that is finite iff the row is (on the device: no sync).
That covers every piece that arrived (``rec.arrived``) with one kernel per tensor, not
one per piece: a MoE layer's hundreds of expert pieces cost two launches. A piece that
splits rows (its region indexes the last dim) records its own max|x| as it arrives, so
a bad value is always named by the piece, never by a neighbour. Quantization records,
per FP8 weight, how many nonzero inputs it flushed to zero. Everything is read back
together, one device sync per ``commit_bytes`` of held results (or once per push with
``hold_all``), before any held layer is installed or committed: a layer holding NaN/Inf
raises ``NonFiniteWeightError`` naming the first arrival (in order) that carried it, and
no live tensor sees it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..errors import NonFiniteWeightError
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
            rec.norms.append(((names,), _amax(view), None))

    @staticmethod
    def record_layer(rec: LayerRecord) -> None:
        """At completion, before quantization frees the staging: one row-wise reduction
        per staging tensor covers every arrival in ``rec.arrived`` (and the zero padding)."""
        if not rec.arrived:
            return
        rows = {attr: _rows(t) for attr, t in rec.staging.items()
                if t.is_floating_point() and t.numel()}
        arrived, rec.arrived = rec.arrived, []
        if rows:
            # x * 0 is 0 for finite x, NaN otherwise: the sum says whether any row is bad.
            bad = torch.stack([r.mul(0).sum() for r in rows.values()]).sum()
            rec.norms.append((arrived, bad, rows))

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
        warn ``fp8_underflow`` for each tensor FP8 flushed mostly to zero. One sync."""
        recs = [rec for rec in recs if rec.norms or rec.underflow]
        if not recs:
            return
        values = [norm for rec in recs for _, norm, _ in rec.norms]
        values = [torch.stack(values)] if values else []
        values += [count.double().reshape(1) for rec in recs for _, *counts in rec.underflow
                   for count in counts]
        host = iter(torch.cat(values).tolist())
        for rec in recs:
            for arrived, _, rows in rec.norms:
                if not math.isfinite(next(host)):
                    names = _first_bad(rec, arrived, rows)
                    raise NonFiniteWeightError("weight holds NaN or Inf", tensor=names[0],
                                               file=file_of(names[0]), layer=rec.name)
        for rec in recs:
            for tensor, _, _ in rec.underflow:
                flushed, nonzero = next(host), next(host)
                if nonzero and flushed / nonzero > UNDERFLOW_WARN_FRACTION:
                    tracer.warning("fp8_underflow", tensor=tensor, layer=rec.name,
                                   flushed=int(flushed), nonzero=int(nonzero),
                                   fraction=round(flushed / nonzero, 6))
            rec.norms.clear()
            rec.underflow.clear()


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
    1-D and 0-D tensors keep every element. FP8 codes (a pre-quantized checkpoint's)
    are read from their bits (``quant.prequantized.fp8_row_flags``)."""
    if is_fp8(t.dtype):
        return fp8_row_flags(t)
    if t.dim() < 2:
        return t.abs()
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
            # A region that splits rows is only logged as part of a whole-parameter
            # arrival, which wrote those whole rows: its rows single the arrival out.
            if maxima is not None and not torch.isfinite(
                    maxima[piece.region[:maxima.dim()]]).all():
                return names
    first = arrived[0]            # NaN/Inf outside every arrival: padding or a default
    return (first,) if isinstance(first, str) else first
