"""Safetensors checkpoints: one file, or a directory of shards (index optional).

Headers are read up front (names, shapes, dtypes; no data) so the session can
plan. Data is read tensor by tensor in the order the session asks for, which
groups the pieces of one layer even when shards interleave them. Files come from
``checkpoint_files`` (confined to the checkpoint) and are read by ``ShardFile``
(``pread``, never a memory map).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import CorruptCheckpointError, DuplicateWeightError
from ..plan import TensorEntry
from .checkpoint_files import checkpoint_files
from .pinned import PinnedRing
from .shard_file import MIN_CHUNK_BYTES, READ_THREADS, ShardFile

PINNED_MAX_BYTES = 2 << 30   # larger tensors go through one reused pageable buffer


class SafetensorsSource:
    """Streams tensors from safetensors files; never reads a whole shard at once."""

    def __init__(self, path: str | Path, *, device: torch.device | str | None = None):
        self.path = Path(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._files, self._index, self._index_file, self._identities = checkpoint_files(
            self.path)
        self._shards: dict[str, ShardFile] = {}
        self._entries: dict[str, TensorEntry] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def inputs(self) -> list[Path]:
        """Every file this source reads: the shards and the index."""
        return [*self._files, *([self._index_file] if self._index_file else [])]

    def shard(self, name: str) -> ShardFile:
        """The open file holding tensor ``name``."""
        return self._open(self._entries[name].file)

    def _open(self, file: str) -> ShardFile:
        shard = self._shards.get(file)
        if shard is None:
            shard = self._shards[file] = ShardFile(file, self._identities.get(file))
        return shard

    def entries(self) -> dict[str, TensorEntry]:
        if self._entries is None:
            entries: dict[str, TensorEntry] = {}
            for path in self._files:
                file = str(path)
                for name, entry in self._open(file).tensors.items():   # in name order
                    if name in entries:
                        raise DuplicateWeightError("tensor appears in two files", tensor=name,
                                                   file=f"{entries[name].file} and {file}")
                    entries[name] = entry
            for name, file in self._index.items():
                if name in entries and entries[name].file != file:
                    raise CorruptCheckpointError(
                        f"index places the tensor in {file} but it is in {entries[name].file}",
                        tensor=name, file=file)
            self._entries = entries
        return self._entries

    def index(self) -> dict[str, str]:
        return dict(self._index)

    def read(self, order: Iterable[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        entries = self.entries()
        names = list(entries if order is None else order)
        if self.device.type == "cuda":
            yield from self._read_pinned(names)
            return
        for name in names:
            yield name, self.read_tensor(name)

    def read_tensor(self, name: str) -> torch.Tensor:
        """``name`` read into a new CPU tensor the caller owns."""
        entry = self._entries[name]
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._open(entry.file).read_into(name, out, self._threads(entry.nbytes))
        return out.view(entry.dtype).view(entry.shape)

    def _read_pinned(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Reads straight into pinned buffers; the device copy of one tensor overlaps
        the read of the next."""
        largest = max((self._entries[n].nbytes for n in names), default=0)
        ring = PinnedRing(min(largest, PINNED_MAX_BYTES), self.device) if largest else None
        spill = None   # a copy from pageable memory returns once it has read the source
        for name in names:
            entry = self._entries[name]
            if not entry.nbytes:
                yield name, torch.empty(entry.shape, dtype=entry.dtype)
                continue
            pinned = entry.nbytes <= ring.nbytes
            if pinned:
                buffer = ring.take(entry.nbytes)
            else:
                if spill is None:
                    spill = torch.empty(largest, dtype=torch.uint8)
                buffer = spill[:entry.nbytes]
            self._open(entry.file).read_into(name, buffer, self._threads(entry.nbytes))
            yield name, buffer.view(entry.dtype).view(entry.shape)
            if pinned:
                ring.release()   # the consumer has enqueued its copy from the buffer by now

    def _threads(self, nbytes: int) -> ThreadPoolExecutor | None:
        if nbytes < 2 * MIN_CHUNK_BYTES or READ_THREADS == 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="loadfsm-read")
        return self._pool

    def file_of(self, name: str) -> str | None:
        entry = (self._entries or {}).get(name)
        return entry.file if entry else self._index.get(name)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
