"""Which elements of a staging tensor an engine's ``weight_loader`` wrote.

The engine hook runs each loader call under ``WriteTracker``: a ``TorchFunctionMode``
that sees every in-place op (``copy_``, ``fill_``, ``__setitem__``, ``index_copy_``,
``out=``...) whose target shares storage with the staging tensor. A write into a
rectangular view (``narrow``, a unit-step slice, ``param.data[e]``) is recorded as a box,
one ``(start, stop)`` per dimension: O(ndim) per write, whatever the tensor's size, the
case of every loader of vLLM's own layers. Any other write (a stepped slice, a transpose,
advanced indexing, ``index_copy_``, ``scatter_``, ``masked_fill_``...) is tracked exactly
on a boolean mask of the staging tensor, made at the first such write: the hook never
takes a write it cannot account for as covering rows it did not touch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

Box = tuple[tuple[int, int], ...]

# In-place methods that change flags, not data.
_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "retain_grad_", "resize_"})


def _index_dim(mask, args, kwargs):
    dim, index = (args[1], args[2]) if len(args) > 2 else (kwargs["dim"], kwargs["index"])
    mask.index_fill_(dim, index, True)


def _scatter(mask, args, kwargs):
    dim, index = (args[1], args[2]) if len(args) > 2 else (kwargs["dim"], kwargs["index"])
    mask.scatter_(dim, index, True)


def _index_put(mask, args, kwargs):
    mask.index_put_(tuple(args[1] if len(args) > 1 else kwargs["indices"]),
                    torch.tensor(True, device=mask.device))


def _masked(mask, args, kwargs):
    mask |= (args[1] if len(args) > 1 else kwargs["mask"]).to(mask.device)


def _put(mask, args, kwargs):
    mask.view(-1).index_fill_(0, (args[1] if len(args) > 1 else kwargs["index"]).reshape(-1)
                              % mask.numel(), True)


def _setitem(mask, args, kwargs):
    mask[args[1]] = True


# Ops that write only the elements their indices name: the same indices mark the mask.
_INDEXED: dict[str, Callable] = {
    "__setitem__": _setitem, "index_copy_": _index_dim, "index_fill_": _index_dim,
    "index_add_": _index_dim, "index_reduce_": _index_dim, "scatter_": _scatter,
    "scatter_add_": _scatter, "scatter_reduce_": _scatter, "index_put_": _index_put,
    "_index_put_impl_": _index_put, "masked_fill_": _masked, "masked_scatter_": _masked,
    "put_": _put,
}


class WriteTracker(TorchFunctionMode):
    """Records every write into ``base`` (contiguous): ``boxes`` for rectangular views,
    ``mask`` (``None`` until needed) for every other write, element by element."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.base = base
        self._storage = base.untyped_storage().data_ptr()
        self.boxes: list[Box] = []
        self.mask: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor) and self._ours(out):
            self._whole(out)
        elif args and isinstance(args[0], torch.Tensor) and self._ours(args[0]):
            target = args[0]
            if name == "__setitem__":
                view = target[args[1]]
                if self._ours(view) and not _advanced(args[1]):
                    self._whole(view)
                else:
                    _setitem(self._mask_of(target), args, kwargs)
            elif name in _INDEXED:
                _INDEXED[name](self._mask_of(target), args, kwargs)
            elif name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
                self._whole(target)
        return func(*args, **kwargs)

    def _ours(self, tensor: torch.Tensor) -> bool:
        return (not tensor.is_meta and tensor.numel() > 0
                and tensor.untyped_storage().data_ptr() == self._storage)

    def _whole(self, view: torch.Tensor) -> None:
        box = view_box(self.base, view)
        if box is not None:
            self.boxes.append(box)
        else:
            self._mask_of(view).fill_(True)

    def _mask_of(self, view: torch.Tensor) -> torch.Tensor:
        """The mask's elements at exactly ``view``'s positions in ``base``."""
        if self.mask is None:
            self.mask = torch.zeros(self.base.shape, dtype=torch.bool, device=self.base.device)
        return self.mask.as_strided(view.shape, view.stride(),
                                    view.storage_offset() - self.base.storage_offset())

    def written(self) -> torch.Tensor:
        """Every element written, as a mask of ``base`` (boxes painted in)."""
        if self.mask is None:
            self.mask = torch.zeros(self.base.shape, dtype=torch.bool, device=self.base.device)
        for box in self.boxes:
            self.mask[box_index(box)] = True
        self.boxes = []
        return self.mask


def _advanced(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (torch.Tensor, list)) or (isinstance(p, slice) and p.step not in
                                                       (None, 1)) for p in parts)


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


def box_index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def full_box(shape: torch.Size) -> Box:
    return tuple((0, n) for n in shape)


def box_within(inner: Box, outer: Box) -> bool:
    return all(a >= c and b <= d for (a, b), (c, d) in zip(inner, outer))


def mask_box(mask: torch.Tensor) -> Box | None:
    """The bounding box of the ``True`` elements of ``mask`` (``None``: none)."""
    if not bool(mask.any()):
        return None
    box = []
    for d in range(mask.dim()):
        hit = mask.any(dim=tuple(i for i in range(mask.dim()) if i != d)).nonzero()
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def unwritten_rows(mask: torch.Tensor, box: Box, limit: int = 8) -> str:
    """The rows (first dimension of ``box`` longer than one) of ``box`` not wholly written."""
    region = mask[box_index(box)]
    d = next((i for i, (a, b) in enumerate(box) if b - a > 1), 0)
    rows = (~region).movedim(d, 0).reshape(region.shape[d], -1).any(1).nonzero().flatten()
    start = box[d][0]
    shown = ", ".join(str(start + int(r)) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"dim {d} rows {shown}{more}"


def box_text(box: Box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def zero_outside(tensor: torch.Tensor, box: Box) -> None:
    """Zero every element of ``tensor`` outside ``box`` (at most two slabs per dimension)."""
    lead: tuple = ()
    for start, stop in box:
        tensor[lead + (slice(0, start),)].zero_()
        tensor[lead + (slice(stop, None),)].zero_()
        lead += (slice(start, stop),)
