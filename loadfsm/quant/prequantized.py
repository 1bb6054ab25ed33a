"""Pre-quantized FP8 weights: where their scales go, and the module they are installed as.

A layer fed by several checkpoint tensors (fused q/k/v; per-expert gate/up of stacked
experts) gets each tensor's scale as a piece of one scale tensor: per-block and
per-channel scales are rows of the layer's scale (``scale_region``); per-tensor scales
are one entry each of a ``[pieces]`` vector (per expert: ``[E, pieces]``) that
``kernel_scale`` turns into the layer's one scale (per expert). The FP8 codes are
installed as they arrived: no full-precision copy is ever made.
"""

from __future__ import annotations

import math

import torch

from loadfsm.quant.fp8 import _CHUNK_BYTES, _quantize_with_inv, fp8_scale_shape
from loadfsm.quant.fp8_layout import Fp8CheckpointConfig
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts


class PrequantizedFp8Linear(Fp8Linear):
    """An ``Fp8Linear`` loaded from a pre-quantized checkpoint; ``layout`` says what a
    weight push feeds it (FP8 weights with their scales, as the checkpoint held them)."""

    layout: Fp8CheckpointConfig

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prequantized={self.layout.granularity}"


class PrequantizedFp8StackedExperts(Fp8StackedExperts):
    """``Fp8StackedExperts`` loaded from a pre-quantized checkpoint (see
    ``PrequantizedFp8Linear``)."""

    layout: Fp8CheckpointConfig

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prequantized={self.layout.granularity}"


def scale_slot_shape(layout: Fp8CheckpointConfig, weight_shape: tuple[int, ...],
                     pieces: int) -> torch.Size:
    """The staging shape of a weight's scales: the kernel's for blocks and channels; for
    per-tensor scales one stored scale per piece of each matrix (``pieces`` of them; a
    single piece: the stored shape), per expert of stacked weights."""
    if layout.granularity != "tensor":
        return fp8_scale_shape(weight_shape, layout.stored)
    per = (pieces,) if pieces > 1 else ()
    return torch.Size((*weight_shape[:-2], *per, *layout.tensor_scale_shape))


def scale_region(layout: Fp8CheckpointConfig, region: tuple, index: int, pieces: int,
                 rows: int) -> tuple:
    """The region of the scale staging that the scale of the weight piece at ``region``
    fills: the piece is the ``index``-th of the ``pieces`` of its matrix (an expert of
    stacked weights, picked by a leading int), whose matrices have ``rows`` rows.

    Raises:
        ValueError: a piece that is not a row range, or rows that split a block.
    """
    lead: tuple = ()
    if region and isinstance(region[0], int):
        lead, region = (region[0],), region[1:]
    if layout.granularity == "tensor":
        return lead + ((index,) if pieces > 1 else ())
    if not region:
        return lead
    if len(region) != 1 or not isinstance(region[0], slice):
        raise ValueError(f"FP8 scales follow weight pieces along rows only, got {region}")
    start, stop = region[0].start or 0, region[0].stop
    if layout.granularity == "channel":
        return lead + (slice(start, stop),)
    bn = layout.block_size[0]
    if start % bn or (stop % bn and stop != rows):
        raise ValueError(f"rows {start}:{stop} split a {bn}-row scale block: the pieces of "
                         f"a fused block-FP8 weight must be whole blocks")
    return lead + (slice(start // bn, math.ceil(stop / bn)),)


def kernel_scale(layout: Fp8CheckpointConfig, q: torch.Tensor, scale: torch.Tensor,
                 piece_rows: list[slice]) -> torch.Tensor:
    """The installed scale of FP8 codes ``q`` (``[N, K]`` or ``[E, N, K]``) whose staged
    scales are ``scale``; ``piece_rows``: the rows of each piece of one matrix.

    Per-tensor scales of several pieces become one per matrix, as vLLM does: each
    piece's codes are requantized in place to the largest scale (exact when the scales
    are equal, as they are when one tensor was quantized and split).
    """
    if layout.granularity != "tensor":
        return scale
    lead = q.shape[:-2]
    if len(piece_rows) <= 1:
        return scale.reshape(lead)
    stored = scale.reshape(*lead, len(piece_rows))
    largest = stored.amax(dim=-1)
    step = max(1, _CHUNK_BYTES // (4 * q.shape[-1]))
    matrices = [(q, stored, largest)] if q.dim() == 2 else zip(q, stored, largest)
    for codes, scales, top in matrices:
        for rows, piece_scale in zip(piece_rows, scales):
            ratio = piece_scale / top
            for r0 in range(rows.start, rows.stop, step):
                part = codes[r0:min(rows.stop, r0 + step)]
                part.copy_(_quantize_with_inv(part, ratio))
    return largest


# e4m3fn: NaN is every bit set but the sign (it has no Inf); e5m2: exponent all ones.
_NONFINITE_BITS = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _NONFINITE_BITS


def fp8_row_flags(t: torch.Tensor) -> torch.Tensor:
    """Per row of the FP8 tensor ``t`` (per element when 1-D or 0-D), a float32 value
    that is NaN iff the row holds a NaN or Inf code, else 0: read from the bits, since
    no device has a norm kernel for FP8. Temporaries: two bytes per element."""
    bits = _NONFINITE_BITS[t.dtype]
    bad = (t.view(torch.uint8) & bits) == bits
    if t.dim() >= 2:
        bad = bad.any(dim=-1)
    return torch.zeros(bad.shape, dtype=torch.float32, device=t.device).masked_fill_(
        bad, float("nan"))
