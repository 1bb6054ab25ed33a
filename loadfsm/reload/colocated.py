"""Weights between two processes on one device: shared flattened buckets, metadata per push.

Colocated RL (trainer and engine on the same GPU, in two processes) cannot use NCCL
between the two; they share memory instead. The trainer owns ``buckets`` flattened
buffers (CUDA memory shared by IPC handle on GPUs, an anonymous ``memfd`` on CPU, so CI
runs the same code), shares each once, and per push sends only small messages over a
``multiprocessing`` connection (a ``Pipe()`` end, or ``Listener``/``Client`` on an
``AF_UNIX`` address for processes that are not parent and child, such as Ray actors),
in steps C1..C5 (ARCHITECTURE.md). A bucket's table (names, shapes, dtypes, offsets)
travels only when the push's layout changed; both sides keep their views of the bucket,
so a push of many small tensors costs little Python per tensor. A tensor of at least
``direct_min_bytes`` is not copied into a bucket: the engine maps its storage and reads
it in place (``colocated_direct``), acknowledging it like a bucket; the trainer holds it
until then.

The engine never waits forever: a trainer process that is gone (closed connection, or a
pid that no longer runs) or silent for ``timeout_s`` in the middle of a push fails the
push with ``SenderDiedError``; every uncommitted layer keeps its old weights.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Iterable

import torch
from torch.multiprocessing.reductions import reduce_tensor

from ..errors import LoadError, PushError
from ..loading.driver import indexed
from .colocated_direct import DirectShares

DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_TIMEOUT_S = 300.0     # silence mid-push before the peer counts as gone
POLL_S = 0.5                 # how often a waiting side checks that its peer still runs
_ALIGN = 64


class SenderDiedError(PushError):
    """The trainer process died, closed its connection or went silent mid-push.

    Layers not in ``committed`` keep their old weights."""


class ReceiverDiedError(LoadError):
    """The engine closed its connection or stopped answering while the trainer waited."""


@dataclass
class SharedBucket:
    """One shared buffer; on CPU the mapping that backs ``tensor`` is kept alongside."""

    tensor: torch.Tensor
    mapping: mmap.mmap | None = None

    def close(self) -> None:
        self.tensor = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:       # a view is still alive somewhere: unmapped with it
                pass


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def bucket_views(bucket: torch.Tensor, table: list) -> list[torch.Tensor]:
    """Each tensor of ``table`` (name, shape, dtype, offset) as a view of ``bucket``."""
    return [bucket[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for _, shape, dtype, offset in table]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:               # no procfs: kill(0) is all we know
        return True


def pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def share(conn: Connection, message: dict, whole: torch.Tensor, fd: int | None = None) -> None:
    """C3: ``message`` with the handle of ``whole`` (uint8, a whole bucket or trainer
    storage): its CUDA IPC handle, or (CPU) ``fd`` of its shared memory, passed over
    ``conn``."""
    if whole.is_cuda:
        conn.send({**message, "size": whole.numel(), "cuda": reduce_tensor(whole)})
    else:
        conn.send({**message, "size": whole.numel(), "cuda": None})
        send_handle(conn, fd, 0)


def stream_sync(device: torch.device) -> None:
    """The work this thread queued on ``device`` (a bucket's fill) is done; other streams
    of the process run on."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ColocatedSender:
    """Trainer side: packs named tensors into rotating shared buckets.

    Args:
        conn: one end of a duplex ``multiprocessing`` connection to the engine.
        bucket_bytes: bytes per bucket; a tensor larger than that gets a bucket that grows
            to fit it (shared again once).
        buckets: how many buckets rotate (>= 2: the trainer fills one while the engine
            reads another).
        device: where buckets live: the engine's device (``"cuda"``: CUDA IPC, both
            processes on the same GPU). Defaults to the first pushed tensor's device.
        timeout_s: seconds to wait for the engine's acknowledgement before
            ``ReceiverDiedError``.
        direct_min_bytes: a tensor of at least that many bytes, on the buckets' device,
            is shared directly: the engine reads its storage in place, no bucket copy
            (on CPU the storage moves into shared memory at its first push). ``None``:
            ``bucket_bytes``; ``math.inf``: every tensor goes through a bucket.
    """

    def __init__(self, conn: Connection, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 buckets: int = 2, device=None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 direct_min_bytes: float | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2 (one filled while one is read), got "
                             f"{buckets}")
        if direct_min_bytes is None:
            direct_min_bytes = bucket_bytes
        if direct_min_bytes < 1:
            raise ValueError(f"direct_min_bytes must be >= 1, got {direct_min_bytes}")
        self.conn, self.bucket_bytes, self.timeout_s = conn, bucket_bytes, timeout_s
        self.direct_min_bytes = direct_min_bytes
        self.device = indexed(torch.device(device)) if device is not None else None
        self._buckets: list[SharedBucket | None] = [None] * buckets
        self._busy: set[int] = set()          # buckets the engine has not acknowledged
        self._next = 0
        # Per bucket of a push, in order: the (bucket, table) the engine last received
        # there. A push with the same layout sends no table (the engine keeps its views).
        self._layouts: list[tuple[int, list] | None] = []
        self._position = 0
        self._direct = DirectShares()
        self._lent: dict[int, torch.Tensor] = {}   # direct tensors the engine may read
        self._lends = 0
        self.conn.send({"kind": "hello", "pid": os.getpid(),                         # C1
                        "pid_namespace": pid_namespace()})

    @torch.no_grad()
    def __call__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                 version=None) -> int:
        """Send one push, stamped ``version`` on the engine; returns the bytes of tensor
        data sent, once the engine has read them all.

        Raises:
            ReceiverDiedError: the engine went away.
            Whatever the iterator raised, after telling the engine to roll back (and
            once it no longer reads any tensor of the trainer's).
        """
        self.conn.send({"kind": "begin", "version": version})                        # C2
        self._drop(self._direct.begin())
        self._next = self._position = 0   # the same layout fills the same buckets
        pending: list[tuple[str, torch.Tensor]] = []
        size = sent = 0
        try:
            for name, tensor in named_tensors:
                tensor = tensor.detach()
                n = tensor.nbytes
                if n >= self.direct_min_bytes and self._on_bucket_device(tensor):
                    sent += self._send_direct(name, tensor)
                    continue
                if pending and size + n > self.bucket_bytes:
                    sent += self._send_bucket(pending)
                    pending, size = [], 0
                pending.append((name, tensor))
                size += _aligned(n)
            if pending:
                sent += self._send_bucket(pending)
        except ReceiverDiedError:
            raise
        except BaseException as exc:
            try:
                self.conn.send({"kind": "abort", "reason": f"{type(exc).__name__}: {exc}"})
                self._drain()         # the trainer may change its tensors once we raise
            except (OSError, ReceiverDiedError):
                pass                  # the engine is gone too; the original error says why
            raise
        self._drop(self._direct.end())
        self.conn.send({"kind": "end"})                                              # C5
        self._drain()
        return sent

    def _on_bucket_device(self, tensor: torch.Tensor) -> bool:
        return self.device is None or tensor.device == self.device

    def _send_direct(self, name: str, tensor: torch.Tensor) -> int:
        """C4 for one tensor read in place: its storage shared (C3) unless the engine
        maps it already; the tensor held until the engine acknowledges it."""
        storage = tensor.untyped_storage()
        mapping = self._direct.mapped(storage)
        if mapping is None:
            # CPU: the storage moves into shared memory (once; the trainer keeps using it)
            fd = None if tensor.is_cuda else storage._share_fd_cpu_()[0]
            mapping = self._direct.share_as(storage)
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            share(self.conn, {"kind": "share", "direct": mapping}, whole, fd)
        stream_sync(tensor.device)              # the trainer's writes landed
        self._lends += 1
        self._lent[self._lends] = tensor
        self.conn.send({"kind": "direct", "id": mapping, "lent": self._lends,        # C4
                        "tensor": (name, tuple(tensor.shape), tensor.stride(),
                                   tensor.storage_offset(), tensor.dtype)})
        # Take the acknowledgements already here: the engine blocks on a full connection
        # as we do, and a push of many direct tensors would fill it both ways.
        while self._lent and self.conn.poll(0):
            self._take_ack()
        return tensor.nbytes

    def _drop(self, mappings: list[int]) -> None:
        if mappings:
            self.conn.send({"kind": "drop", "direct": mappings})

    def _drain(self) -> None:
        """Wait until the engine read every bucket and direct tensor sent."""
        while self._busy or self._lent:
            self._take_ack()

    def _send_bucket(self, tensors: list[tuple[str, torch.Tensor]]) -> int:
        index, self._next = self._next, (self._next + 1) % len(self._buckets)
        while index in self._busy:
            self._take_ack()
        entries, offset = [], 0
        for name, tensor in tensors:
            entries.append((name, tuple(tensor.shape), tensor.dtype, offset))
            offset += _aligned(tensor.nbytes)
        bucket = self._bucket(index, offset, tensors[0][1].device)
        position, self._position = self._position, self._position + 1
        if position == len(self._layouts):
            self._layouts.append(None)
        layout = self._layouts[position]
        if layout is not None and layout[:2] == (index, entries):
            targets, table = layout[2], None   # as last push: the engine reuses its views
        else:
            targets, table = bucket_views(bucket, entries), entries
            self._layouts[position] = (index, entries, targets)
        for target, (_, tensor) in zip(targets, tensors):
            target.copy_(tensor, non_blocking=True)
        stream_sync(bucket.device)
        self._busy.add(index)
        self.conn.send({"kind": "bucket", "index": index, "tensors": table})         # C4
        return sum(t.nbytes for _, t in tensors)

    def _bucket(self, index: int, size: int, first_device: torch.device) -> torch.Tensor:
        """Bucket ``index``, at least ``size`` bytes; made and shared (C3) when it is new
        or too small."""
        held = self._buckets[index]
        if held is not None and held.tensor.numel() >= size:
            return held.tensor
        self._layouts = [None if layout is not None and layout[0] == index else layout
                         for layout in self._layouts]      # the engine forgets them too
        if held is not None:
            held.close()
        device = self.device or first_device
        size = max(size, _aligned(self.bucket_bytes))
        if device.type == "cuda":
            tensor = torch.empty(size, dtype=torch.uint8, device=device)
            self._buckets[index] = SharedBucket(tensor)
            share(self.conn, {"kind": "share", "index": index}, tensor)
        else:
            fd = os.memfd_create(f"loadfsm-bucket-{index}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mapping = mmap.mmap(fd, size)
                self._buckets[index] = SharedBucket(
                    torch.frombuffer(mapping, dtype=torch.uint8), mapping)
                share(self.conn, {"kind": "share", "index": index},
                      self._buckets[index].tensor, fd)
            finally:
                os.close(fd)
        return self._buckets[index].tensor

    def _take_ack(self) -> None:
        if not self.conn.poll(self.timeout_s):
            raise ReceiverDiedError(f"the engine did not acknowledge a bucket or tensor "
                                    f"within {self.timeout_s} s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise ReceiverDiedError(f"the engine closed its connection: {exc!r}") from exc
        if "lent" in message:
            del self._lent[message["lent"]]     # the engine read it: the trainer's again
        else:
            self._busy.discard(message["index"])

    def close(self) -> None:
        """Free the buckets and let go of the tensors lent (an engine still mapping a
        bucket or a trainer storage keeps it until it closes)."""
        self._layouts.clear()
        self._direct.clear()
        self._lent.clear()
        for bucket in self._buckets:
            if bucket is not None:
                bucket.close()
        self._buckets = [None] * len(self._buckets)
