"""Which region of a staging tensor an engine's ``weight_loader`` wrote.

The engine hook runs each loader call under ``WriteTracker``: a ``TorchFunctionMode``
that sees every in-place op (``copy_``, ``fill_``, ``__setitem__``, ``out=``) whose
target shares storage with the staging tensor and turns the target view into a box,
one ``(start, stop)`` per dimension of the staging tensor. O(ndim) per write, whatever
the tensor's size, so checking a call never scans the parameter.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

Box = tuple[tuple[int, int], ...]

# In-place methods that change flags, not data.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "retain_grad_", "resize_"})


class WriteTracker(TorchFunctionMode):
    """Records the box of every write into ``base`` (``None`` for a write no box describes)."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.base = base
        self._storage = base.untyped_storage().data_ptr()
        self.boxes: list[Box | None] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self._target(getattr(func, "__name__", ""), args, kwargs)
        if target is not None:
            self.boxes.append(view_box(self.base, target))
        return func(*args, **kwargs)

    def _target(self, name: str, args, kwargs) -> torch.Tensor | None:
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor) and self._ours(out):
            return out
        if not args or not isinstance(args[0], torch.Tensor) or not self._ours(args[0]):
            return None
        if name == "__setitem__":
            view = args[0][args[1]]
            return view if self._ours(view) else args[0]   # advanced indexing: no view
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
            return args[0]
        return None

    def _ours(self, tensor: torch.Tensor) -> bool:
        return (not tensor.is_meta and tensor.numel() > 0
                and tensor.untyped_storage().data_ptr() == self._storage)


def view_box(base: torch.Tensor, view: torch.Tensor) -> Box | None:
    """The box of ``base`` that ``view`` covers, or ``None`` when it is no box (a transpose,
    a stepped slice). ``base`` must be contiguous, as staging tensors are."""
    if not base.is_contiguous():
        return None
    shape, strides = base.shape, base.stride()
    offset = view.storage_offset() - base.storage_offset()
    coords = [(offset // s) % n for s, n in zip(strides, shape)]
    box = [(c, c + 1) for c in coords]
    d = 0
    for size, stride in zip(view.shape, view.stride()):
        if size == 1:
            continue
        while d < len(shape) and not (strides[d] == stride and shape[d] > 1):
            d += 1
        if d == len(shape) or coords[d] + size > shape[d]:
            return None
        box[d] = (coords[d], coords[d] + size)
        d += 1
    return tuple(box)


def region_box(shape: torch.Size, region: tuple) -> Box:
    """The box a ``Piece.region`` (ints and unit-step slices) selects in ``shape``."""
    box = []
    for d, n in enumerate(shape):
        index = region[d] if d < len(region) else slice(None)
        if isinstance(index, int):
            box.append((index, index + 1))
        else:
            start, stop, _ = index.indices(n)
            box.append((start, stop))
    return tuple(box)


def full_box(shape: torch.Size) -> Box:
    return tuple((0, n) for n in shape)


def box_numel(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


def box_within(inner: Box, outer: Box) -> bool:
    return all(a >= c and b <= d for (a, b), (c, d) in zip(inner, outer))


def bounding_box(boxes: list[Box]) -> Box:
    return tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes))
                 for d in range(len(boxes[0])))


def box_text(box: Box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def zero_outside(tensor: torch.Tensor, box: Box) -> None:
    """Zero every element of ``tensor`` outside ``box`` (at most two slabs per dimension)."""
    lead: tuple = ()
    for start, stop in box:
        tensor[lead + (slice(0, start),)].zero_()
        tensor[lead + (slice(stop, None),)].zero_()
        lead += (slice(start, stop),)
