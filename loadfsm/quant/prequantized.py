"""Pre-quantized FP8 weights: where their scales go, and the module they are installed as.

A layer fed by several checkpoint tensors (fused q/k/v) gets each tensor's scale as a
piece of one scale tensor: per-block and per-channel scales are rows of the layer's
scale (``scale_region``); per-tensor scales are one entry each of a ``[pieces]`` vector
that ``kernel_scale`` turns into the layer's one scale. The FP8 codes are installed as
they arrived: no full-precision copy is ever made.
"""

from __future__ import annotations

import math

import torch

from loadfsm.quant.fp8 import _CHUNK_BYTES, _quantize_with_inv, fp8_scale_shape
from loadfsm.quant.fp8_layout import Fp8CheckpointConfig
from loadfsm.quant.linear import Fp8Linear


class PrequantizedFp8Linear(Fp8Linear):
    """An ``Fp8Linear`` loaded from a pre-quantized checkpoint; ``layout`` says what a
    weight push feeds it (FP8 weights with their scales, as the checkpoint held them)."""

    layout: Fp8CheckpointConfig

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prequantized={self.layout.granularity}"


def scale_slot_shape(layout: Fp8CheckpointConfig, weight_shape: tuple[int, int],
                     pieces: int) -> torch.Size:
    """The staging shape of a weight's scales: the kernel's for blocks and channels, one
    stored scale per piece for per-tensor scales (a single piece: the stored shape)."""
    if layout.granularity != "tensor":
        return fp8_scale_shape(weight_shape, layout.stored)
    lead = (pieces,) if pieces > 1 else ()
    return torch.Size((*lead, *layout.tensor_scale_shape))


def scale_region(layout: Fp8CheckpointConfig, region: tuple, index: int, pieces: int,
                 rows: int) -> tuple:
    """The region of the scale staging that the scale of the weight piece at ``region``
    (the ``index``-th of ``pieces``, in a weight of ``rows`` rows) fills.

    Raises:
        ValueError: a piece that is not a row range, or rows that split a block.
    """
    if layout.granularity == "tensor":
        return (index,) if pieces > 1 else ()
    if not region:
        return ()
    if len(region) != 1 or not isinstance(region[0], slice):
        raise ValueError(f"FP8 scales follow weight pieces along rows only, got {region}")
    start, stop = region[0].start or 0, region[0].stop
    if layout.granularity == "channel":
        return (slice(start, stop),)
    bn = layout.block_size[0]
    if start % bn or (stop % bn and stop != rows):
        raise ValueError(f"rows {start}:{stop} split a {bn}-row scale block: the pieces of "
                         f"a fused block-FP8 weight must be whole blocks")
    return (slice(start // bn, math.ceil(stop / bn)),)


def kernel_scale(layout: Fp8CheckpointConfig, q: torch.Tensor, scale: torch.Tensor,
                 piece_rows: list[slice]) -> torch.Tensor:
    """The installed scale of FP8 codes ``q`` whose staged scales are ``scale``.

    Per-tensor scales of several pieces become one, as vLLM does: each piece's codes are
    requantized in place to the largest scale (exact when the scales are equal, as they
    are when one tensor was quantized and split).
    """
    if layout.granularity != "tensor":
        return scale
    if len(piece_rows) <= 1:
        return scale.reshape(())
    stored = scale.reshape(len(piece_rows))
    largest = stored.amax()
    for i, rows in enumerate(piece_rows):
        ratio = stored[i] / largest
        k = q.shape[-1]
        step = max(1, _CHUNK_BYTES // (4 * k))
        for r0 in range(rows.start, rows.stop, step):
            part = q[r0:min(rows.stop, r0 + step)]
            part.copy_(_quantize_with_inv(part, ratio))
    return largest.reshape(())

