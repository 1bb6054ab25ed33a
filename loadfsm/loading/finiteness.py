"""The finiteness batch: quantized layers wait here until their inputs are proven finite.

Every arriving piece records max|x| on the device (NaN or Inf shows there, without a
sync); quantization records, per FP8 weight, how many nonzero inputs it flushed to zero.
Both are read back together, one device sync per ``commit_bytes`` of held results (or
once per push with ``hold_all``), before any held layer is installed or committed: a
layer holding NaN/Inf raises ``NonFiniteWeightError`` and no live tensor sees it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..errors import NonFiniteWeightError
from ..layer import LayerRecord
from ..quant.fp8 import flushed_to_zero, sample_rows
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
        """Note ``view``'s max|x| on the device: NaN or Inf iff it holds one."""
        if view.is_floating_point() and view.numel():     # an empty max|x| raises
            rec.norms.append((names, torch.linalg.vector_norm(view, ord=float("inf"))))

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
        values = [norm.double() for rec in recs for _, norm in rec.norms]
        values += [count.double() for rec in recs for _, *counts in rec.underflow
                   for count in counts]
        host = iter(torch.stack(values).tolist())
        for rec in recs:
            for names, _ in rec.norms:
                if not math.isfinite(next(host)):
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
