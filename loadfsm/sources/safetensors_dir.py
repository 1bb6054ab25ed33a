"""Safetensors checkpoints: one file, or a directory of shards (index optional).

Headers are read up front (names, shapes, dtypes; no data) so the session can
plan. Data is read tensor by tensor in the order the session asks for, which
groups the pieces of one layer even when shards interleave them. Files come from
``checkpoint_files`` (confined to the checkpoint) and are read by ``ShardFile``
(``pread``, never a memory map).
"""

from __future__ import annotations

import queue
import threading
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
READ_AHEAD = 3               # pinned buffers: one being copied, the next ones being read
_END, _SPILL = object(), object()


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
        """``(name, tensor)`` in ``order``; each tensor lives in a reused buffer, valid
        until the next one is asked for (the driver copies it into staging first)."""
        entries = self.entries()
        yield from self._read_ahead_ring(list(entries if order is None else order))

    def read_tensor(self, name: str) -> torch.Tensor:
        """``name`` read into a new CPU tensor the caller owns."""
        entry = self._entries[name]
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._open(entry.file).read_into(name, out, self._threads(entry.nbytes))
        return out.view(entry.dtype).view(entry.shape)

    def _read_ahead_ring(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Reads straight into (on CUDA, pinned) buffers, ahead of the consumer: a reader thread
        fills the next buffers while the consumer copies one to the device and quantizes
        (the ring bounds how far ahead). Tensors larger than a ring buffer go through one
        pageable buffer, reused once its consumer is done."""
        largest = max((self._entries[n].nbytes for n in names), default=0)
        ring = PinnedRing(min(largest, PINNED_MAX_BYTES), self.device, READ_AHEAD)
        spill = _Spill(largest)
        ready: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, name="loadfsm-read-ahead",
                                  args=(names, ring, spill, ready, stop), daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                name, tensor, slot = item
                yield name, tensor
                if slot is _SPILL:
                    spill.free.release()
                elif slot is not None:
                    ring.release(slot)
        finally:
            stop.set()
            spill.free.release()            # a reader waiting for the spill buffer wakes
            reader.join()                   # no read into a buffer outlives the load

    def _read_ahead(self, names: list[str], ring: PinnedRing, spill: "_Spill",
                    ready: queue.SimpleQueue, stop: threading.Event) -> None:
        """The reader thread: each tensor into a free buffer, in order, until ``stop``."""
        try:
            for name in names:
                entry = self._entries[name]
                if not entry.nbytes:
                    ready.put((name, torch.empty(entry.shape, dtype=entry.dtype), None))
                    continue
                if entry.nbytes <= ring.nbytes:
                    taken = ring.acquire(stop)
                    if taken is None:
                        return
                    slot, buffer = taken
                else:
                    spill.free.acquire()
                    if stop.is_set():
                        return
                    slot, buffer = _SPILL, spill.buffer()
                buffer = buffer[:entry.nbytes]
                self._open(entry.file).read_into(name, buffer, self._threads(entry.nbytes))
                ready.put((name, buffer.view(entry.dtype).view(entry.shape), slot))
        except BaseException as exc:        # the consumer raises it, with its own type
            ready.put(exc)
        else:
            ready.put(_END)

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


class _Spill:
    """The one pageable buffer of tensors larger than a pinned buffer (a copy from
    pageable memory returns once it has read the source, so the consumer's return
    frees it)."""

    def __init__(self, nbytes: int):
        self.nbytes, self._buffer = nbytes, None
        self.free = threading.Semaphore(1)

    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        return self._buffer
