"""Checkpoint tensors that read only the slice a tensor-parallel rank asks for.

``safetensors_weights(path)`` yields every checkpoint tensor as a ``LazySlice``:
``narrow`` only narrows what will be read, and the first torch op that needs the data
(an engine loader's ``copy_``) reads just that region from the file with ``pread``
(no memory map, see ``shard_file``). Engine loaders written for tensors
(``loaded_weight.narrow(...)``, ``param.data.copy_(loaded_weight)``, ``loaded_weight.shape``)
work unchanged, and each rank reads only its shard.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Iterator

import torch

from ..ledger import nbytes
from .safetensors_dir import SafetensorsSource

MAX_BLOCKS = 4096   # beyond this many contiguous runs, read whole rows and index them


class LazySlice:
    """A checkpoint tensor not read yet: shape and dtype, ``narrow`` to a region, and the
    data of that region only when a torch op needs it (``__torch_function__``)."""

    def __init__(self, weights: "SafetensorsWeights", name: str, index: tuple[slice, ...],
                 dtype: torch.dtype):
        self._weights, self.name, self._index, self.dtype = weights, name, index, dtype
        self.shape = torch.Size(s.stop - s.start for s in index)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> "LazySlice":
        """The region ``[start, start + length)`` of ``dim``, as ``Tensor.narrow`` (no read)."""
        dim %= self.ndim
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise RuntimeError(f"start ({start}) + length ({length}) exceeds dimension size "
                               f"({self.shape[dim]}) of {self.name}")
        base = self._index[dim].start
        index = list(self._index)
        index[dim] = slice(base + start, base + start + length)
        return LazySlice(self._weights, self.name, tuple(index), self.dtype)

    def read(self) -> torch.Tensor:
        """The region's data, read from the file now."""
        return self._weights.read(self.name, self._index)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_read_all(args), **_read_all(kwargs or {}))

    def __repr__(self) -> str:
        region = ", ".join(f"{s.start}:{s.stop}" for s in self._index)
        return f"LazySlice({self.name}[{region}], dtype={self.dtype})"


def _read_all(value):
    if isinstance(value, LazySlice):
        return value.read()
    if isinstance(value, (list, tuple)):
        return type(value)(_read_all(v) for v in value)
    if isinstance(value, dict):
        return {k: _read_all(v) for k, v in value.items()}
    return value


class SafetensorsWeights:
    """``(name, LazySlice)`` for every tensor of a safetensors file or directory, in file
    order; ``bytes_read`` counts the bytes actually read.

    Args:
        path: a ``.safetensors`` file or a directory of shards (index optional).
    """

    def __init__(self, path: str | Path):
        self._source = SafetensorsSource(path)
        self._entries = self._source.entries()   # headers only, validated
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[str, LazySlice]]:
        for name, entry in self._entries.items():
            yield name, LazySlice(self, name, tuple(slice(0, n) for n in entry.shape),
                                  entry.dtype)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        entry = self._entries[name]
        shape = entry.shape
        if all(s.start == 0 and s.stop == n for s, n in zip(index, shape)):
            tensor = self._source.read_tensor(name)
        else:
            tensor = self._read_region(name, index)
        self.bytes_read += nbytes(tensor)
        return tensor

    def _read_region(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """The region as contiguous runs: one per index of the dims before the last
        narrowed one (whole leading rows past ``MAX_BLOCKS`` runs)."""
        entry = self._entries[name]
        shape, itemsize = entry.shape, entry.dtype.itemsize
        last = max(d for d, (s, n) in enumerate(zip(index, shape)) if (s.start, s.stop) != (0, n))
        outer = [range(s.start, s.stop) for s in index[:last]]
        if math.prod(len(r) for r in outer) > MAX_BLOCKS:
            rows = self._read_rows(name, index[0])
            return rows[(slice(None), *index[1:])].contiguous()
        inner = math.prod(shape[last + 1:])
        run = (index[last].stop - index[last].start) * inner
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        out = torch.empty(math.prod(s.stop - s.start for s in index) * itemsize,
                          dtype=torch.uint8)
        shard = self._source.shard(name)
        base = shard.offsets[name]
        for i, at in enumerate(itertools.product(*outer)):
            first = sum(a * strides[d] for d, a in enumerate(at)) + index[last].start * inner
            shard.read_range(name, base + first * itemsize,
                             out[i * run * itemsize:(i + 1) * run * itemsize])
        return out.view(entry.dtype).view(tuple(s.stop - s.start for s in index))

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        entry = self._entries[name]
        shard = self._source.shard(name)
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        out = torch.empty((rows.stop - rows.start) * row_bytes, dtype=torch.uint8)
        shard.read_range(name, shard.offsets[name] + rows.start * row_bytes, out)
        return out.view(entry.dtype).view(rows.stop - rows.start, *entry.shape[1:])


def safetensors_weights(path: str | Path) -> SafetensorsWeights:
    """The lazy weights iterator an engine's ``load_weights`` takes (see module doc)."""
    return SafetensorsWeights(path)
