"""Tiles of a block-FP8 weight: which changed, and moving them in one index op per tensor.

A block-FP8 weight ``[N, K]`` (stacked experts: ``[E, N, K]``) has one scale per
``bn x bk`` tile, so a tile's bytes and its scale change together and alone. A tile is
addressed by the index of its scale: a row ``(tile_row, tile_col)`` (``(expert, tile_row,
tile_col)``) of an int64 ``[T, dims]`` index. Tiles travel as ``[T, bn, bk]``; a ragged
edge tile is read and written through clamped positions (its last row or column
repeated), so a position written twice gets the same value: no mask, no padding copy and
no host sync, one gather or one ``index_put_`` per tensor, on the tensor's device.
"""

from __future__ import annotations

import math

import torch

from ..quant.config import Fp8Config
from ..quant.fp8 import quantize_fp8
from ..quant.prequantized import is_fp8


def tile_mask(a: torch.Tensor, b: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per tile of ``a`` and ``b`` (same shape and dtype), whether any byte differs:
    bool ``[..., ceil(N / bn), ceil(K / bk)]``. NaN, -0.0 and FP8 compare by their bits."""
    (wa, step), (wb, _) = _words(a, block[1]), _words(b, block[1])
    return _tile_any(wa != wb, block[0], step)


def gather_tiles(t: torch.Tensor, index: torch.Tensor,
                 block: tuple[int, int]) -> torch.Tensor:
    """The tiles of ``t`` at ``index`` (``[T, t.dim()]``), as ``[T, bn, bk]``; a ragged
    edge tile repeats its last row or column."""
    rows, cols = _positions(t.shape, index, block)
    return _indexable(t)[(*_lead(index), rows[:, :, None], cols[:, None, :])].view(t.dtype)


def put_tiles(t: torch.Tensor, index: torch.Tensor, tiles: torch.Tensor,
              block: tuple[int, int]) -> None:
    """Write ``tiles`` (``[T, bn, bk]``) into ``t`` at ``index``, in place. Positions past
    a ragged edge are not written; each clamped position takes its own tile's value."""
    rows, cols = _positions(t.shape, index, block)
    values = _indexable(tiles)
    if t.shape[-2] % block[0] or t.shape[-1] % block[1]:
        local_rows = rows - index[:, -2:-1] * block[0]
        local_cols = cols - index[:, -1:] * block[1]
        which = torch.arange(len(index), device=index.device)[:, None, None]
        values = values[which, local_rows[:, :, None], local_cols[:, None, :]]
    _indexable(t)[(*_lead(index), rows[:, :, None], cols[:, None, :])] = values


def quantize_tiles(tiles: torch.Tensor,
                   block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8`` of each ``[bn, bk]`` tile: FP8 ``[T, bn, bk]`` and scales ``[T]``,
    bit for bit what quantizing the whole weight gives its tiles (a scale sees only its
    tile; a repeated edge row or column changes no maximum)."""
    count, bn, bk = tiles.shape
    q, scale = quantize_fp8(tiles.reshape(count * bn, bk),
                            Fp8Config(granularity="block", block_size=block))
    return q.view(count, bn, bk), scale.view(count)


def tile_count(shape: torch.Size, block: tuple[int, int]) -> int:
    """Tiles of a weight of ``shape``."""
    *lead, n, k = shape
    return math.prod(lead) * math.ceil(n / block[0]) * math.ceil(k / block[1])


def _positions(shape: torch.Size, index: torch.Tensor,
               block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[T, bn]`` and columns ``[T, bk]`` of each tile, clamped into the weight."""
    (bn, bk), (n, k) = block, shape[-2:]
    rows = index[:, -2:-1] * bn + torch.arange(bn, device=index.device)
    cols = index[:, -1:] * bk + torch.arange(bk, device=index.device)
    return rows.clamp_(max=n - 1), cols.clamp_(max=k - 1)


def _lead(index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The expert column of a stacked weight's index, shaped to broadcast over a tile."""
    return tuple(column[:, None, None] for column in index[:, :-2].unbind(1))


def _indexable(t: torch.Tensor) -> torch.Tensor:
    """FP8 as its bytes: index kernels are not built for float8 on every device."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def _words(t: torch.Tensor, bk: int) -> tuple[torch.Tensor, int]:
    """``t``'s bytes as 8-byte words along rows where tiles and rows split evenly (a
    compare on int64 is ~7x faster than on bytes on a CPU), else as bytes; and the
    width of a tile in those units."""
    raw = t.detach().contiguous().view(torch.uint8)
    per_tile = bk * t.element_size()
    if per_tile % 8 == 0 and raw.shape[-1] % 8 == 0 and raw.data_ptr() % 8 == 0:
        return raw.view(torch.int64), per_tile // 8
    return raw, per_tile


def _tile_any(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Per ``bn x bk`` tile of the bool ``x``, whether any is set; the full tiles and the
    ragged edges are reduced as views (at most four reductions)."""
    *lead, n, k = x.shape
    out = torch.empty((*lead, math.ceil(n / bn), math.ceil(k / bk)), dtype=torch.bool,
                      device=x.device)
    for r0, r1, rb in _spans(n, bn):
        for c0, c1, cb in _spans(k, bk):
            # tiles: [..., rows/rb, rb, cols/cb, cb]
            tiles = x[..., r0:r1, c0:c1].unflatten(-1, (-1, cb)).unflatten(-3, (-1, rb))
            out[..., r0 // bn:r0 // bn + (r1 - r0) // rb,
                c0 // bk:c0 // bk + (c1 - c0) // cb] = tiles.any(dim=-1).any(dim=-2)
    return out


def _spans(n: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, end, tile)``: the full tiles of ``range(n)``, then the ragged tail."""
    full = n // block * block
    spans = [(0, full, block)] if full else []
    return spans + [(full, n, n - full)] if n > full else spans
