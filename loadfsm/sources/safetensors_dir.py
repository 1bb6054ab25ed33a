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

# Each buffer of the read-ahead ring. Pinning costs ~0.5 s per GB the first time in a
# process (and torch rounds pinned blocks up to a power of two), so the ring stays small:
# on a GPU a larger tensor streams through it in chunks into its own device tensor.
RING_BYTES = 128 << 20
READ_AHEAD = 3               # ring buffers: one being copied, the next ones being read
PREFETCH_BYTES = 1 << 30     # how far ahead of the reader the kernel is asked to read
PREFETCH_PIECE = 64 << 20    # bytes per hint
PREFETCH_THREADS = 4
_END = object()


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

    @property
    def owned_arrivals(self) -> bool:
        """Whether every tensor this source yields on the session's device is new and
        never written again, so the session may keep it as a layer's storage: on a GPU,
        the device tensors that large tensors are assembled in (the ring is host memory)."""
        return self.device.type == "cuda"

    def _read_ahead_ring(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Reads straight into (on CUDA, pinned) buffers, ahead of the consumer: a reader
        thread fills the next buffers while the consumer copies one to the device and
        quantizes (the ring bounds how far ahead). A tensor larger than a ring buffer goes,
        on a GPU, chunk by chunk through the ring into a device tensor of its own, made
        here, when the consumer reaches it (no earlier: the layers before it hold their
        memory until then); on the CPU through one reused buffer, handed out once at a
        time."""
        largest = max((self._entries[n].nbytes for n in names), default=0)
        ring = PinnedRing(min(largest, RING_BYTES), self.device, READ_AHEAD)
        large = _Large(largest if self.device.type == "cpu" else 0)
        ready: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, name="loadfsm-read-ahead",
                                  args=(names, ring, large, ready, stop), daemon=True)
        reader.start()
        assembling = None
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                name, tensor, slot, at = item
                if at is not None:          # a chunk of a large tensor, copied on its way
                    entry = self._entries[name]
                    if at == 0:
                        assembling = torch.empty(entry.nbytes, dtype=torch.uint8,
                                                 device=self.device)
                    assembling[at:at + tensor.numel()].copy_(tensor, non_blocking=True)
                    ring.release(slot)
                    if at + tensor.numel() < entry.nbytes:
                        continue
                    tensor, slot, assembling = (
                        assembling.view(entry.dtype).view(entry.shape), None, None)
                yield name, tensor
                del tensor      # an assembled device tensor is not kept past its turn
                if slot is large:
                    large.free.release()
                elif slot is not None:
                    ring.release(slot)
        finally:
            stop.set()
            large.free.release()            # a reader waiting for its turn wakes
            reader.join()                   # no read into a buffer outlives the load

    def _read_ahead(self, names: list[str], ring: PinnedRing, large: "_Large",
                    ready: queue.SimpleQueue, stop: threading.Event) -> None:
        """The reader thread: each tensor into a free buffer, in order, until ``stop``."""
        prefetch = _Prefetch(self, names)
        try:
            for name in names:
                prefetch.ahead_of(name)
                entry = self._entries[name]
                if not entry.nbytes:
                    ready.put((name, torch.empty(entry.shape, dtype=entry.dtype), None, None))
                elif entry.nbytes <= ring.nbytes:
                    taken = ring.acquire(stop)
                    if taken is None:
                        return
                    slot, buffer = taken
                    buffer = buffer[:entry.nbytes]
                    self._open(entry.file).read_into(name, buffer, self._threads(entry.nbytes))
                    ready.put((name, buffer.view(entry.dtype).view(entry.shape), slot, None))
                elif self.device.type == "cpu":
                    large.free.acquire()
                    if stop.is_set():
                        return
                    buffer = large.buffer()[:entry.nbytes]
                    self._open(entry.file).read_into(name, buffer, self._threads(entry.nbytes))
                    ready.put((name, buffer.view(entry.dtype).view(entry.shape), large, None))
                elif not self._read_chunks(entry, ring, ready, stop):
                    return
        except BaseException as exc:        # the consumer raises it, with its own type
            ready.put(exc)
        else:
            ready.put(_END)
        finally:
            prefetch.close()

    def _read_chunks(self, entry: TensorEntry, ring: PinnedRing, ready: queue.SimpleQueue,
                     stop: threading.Event) -> bool:
        """A tensor larger than a ring buffer, one buffer at a time (the consumer puts the
        chunks together on the device); ``False`` once ``stop`` is set."""
        shard = self._open(entry.file)
        start = shard.offsets[entry.name]
        for at in range(0, entry.nbytes, ring.nbytes):
            taken = ring.acquire(stop)
            if taken is None:
                return False
            slot, buffer = taken
            chunk = buffer[:min(ring.nbytes, entry.nbytes - at)]
            shard.read_range(entry.name, start + at, chunk, self._threads(chunk.numel()))
            ready.put((entry.name, chunk, slot, at))
        return True

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


class _Prefetch:
    """Keeps the kernel reading ``PREFETCH_BYTES`` ahead of the reader thread: on a cold
    page cache the disk then always has the next tensors queued, where the reader's own
    reads would leave it idle between tensors. The hints (``POSIX_FADV_WILLNEED``) block
    while the kernel queues the reads, so threads of their own issue them, in pieces."""

    def __init__(self, source: SafetensorsSource, names: list[str]):
        self._source, self._names = source, names
        self._next = 0            # the first name not yet prefetched
        self._hinted = 0          # bytes of the names prefetched so far
        self._read = 0            # bytes of the names before the one being read
        self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="loadfsm-prefetch")

    def ahead_of(self, name: str) -> None:
        """``name`` is about to be read: keep the prefetch that far ahead of it."""
        entries = self._source._entries
        while self._next < len(self._names) and self._hinted < self._read + PREFETCH_BYTES:
            entry = entries[self._names[self._next]]
            shard = self._source._open(entry.file)
            start = shard.offsets[entry.name]
            for at in range(0, entry.nbytes, PREFETCH_PIECE):
                self._pool.submit(shard.prefetch, start + at,
                                  min(PREFETCH_PIECE, entry.nbytes - at))
            self._hinted += entry.nbytes
            self._next += 1
        self._read += entries[name].nbytes

    def close(self) -> None:
        """No hint outlives the read (the files close after it)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Large:
    """On the CPU, tensors larger than a ring buffer go through one reused buffer, one at
    a time (a copy from it returns once it has read the source, so the consumer's
    return frees it)."""

    def __init__(self, nbytes: int):
        self.nbytes, self._buffer = nbytes, None
        self.free = threading.Semaphore(1)

    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        return self._buffer
