"""Where an arriving piece lands in its layer's staging, worked out once per name.

The driver keeps one ``PieceLayout`` per checkpoint name, so every later arrival (each
push) does no planning work: a dict lookup, one ``as_strided`` view and one copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..layer import LayerRecord
from ..plan import expected_shape
from .finiteness import locatable


class PieceLayout(NamedTuple):
    """Where one checkpoint name lands, worked out at its first arrival and kept by the
    driver, so later arrivals (every push) do no planning work: the slot attribute, the
    shape and dtype that fit, and the view's ``as_strided`` arguments in a contiguous
    staging tensor (``None``: the whole tensor, or a region strides cannot express)."""

    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    strided: tuple | None
    locatable: bool


def layout_of(rec: LayerRecord, name: str) -> PieceLayout:
    """The layout of checkpoint name ``name`` in ``rec``."""
    piece = rec.pieces[name]
    attr = rec.slot_attr(piece.param)
    slot = rec.slots[attr]
    return PieceLayout(attr, tuple(expected_shape(rec, piece)), slot.dtype,
                       _strided(tuple(slot.shape), piece.region), locatable(rec, piece))


def piece_view(target: torch.Tensor, region: tuple, layout: PieceLayout) -> torch.Tensor:
    """The view of staging tensor ``target`` that ``region`` names."""
    strided = layout.strided
    if strided is None:
        return target[region] if region else target
    if target.is_contiguous():
        return target.as_strided(strided[0], strided[1], target.storage_offset() + strided[2])
    return target[region]


def _strided(shape: tuple[int, ...], region: tuple) -> tuple | None:
    """``(size, stride, offset)`` of ``region`` in a contiguous tensor of ``shape``, for
    ``as_strided`` (one C call, where indexing with a tuple is several); ``None`` for the
    whole tensor or an index strides do not express (a step, an out-of-range int)."""
    if not region or len(region) > len(shape):
        return None
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    size, stride, offset = [], [], 0
    for d, index in enumerate(region):
        if isinstance(index, int):
            if not -shape[d] <= index < shape[d]:
                return None
            offset += (index % shape[d]) * strides[d]
        elif isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(shape[d])
            offset += start * strides[d]
            size.append(max(stop - start, 0))
            stride.append(strides[d])
        else:
            return None
    return (tuple(size) + shape[len(region):], tuple(stride) + tuple(strides[len(region):]),
            offset)
