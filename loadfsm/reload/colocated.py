"""Weights between two processes on one device: shared flattened buckets, metadata per push.

Colocated RL (trainer and engine on the same GPU, in two processes) cannot use NCCL
between the two; they share memory instead. The trainer owns ``buckets`` flattened
buffers (CUDA memory shared by IPC handle on GPUs, an anonymous ``memfd`` on CPU, so CI
runs the same code), shares each once, and per push sends only small messages over a
``multiprocessing`` connection (a ``Pipe()`` end, or ``Listener``/``Client`` on an
``AF_UNIX`` address for processes that are not parent and child, such as Ray actors):

- **C1** ``hello`` once: the trainer's pid (and pid namespace), for the engine's
  liveness check.
- **C2** ``begin``: a push starts, with its ``weight_version``.
- **C3** ``share``, once per bucket (again only when a bucket must grow): its handle;
  the engine opens it and keeps it across pushes.
- **C4** ``bucket``: which bucket, and each tensor's name, shape, dtype and 64-byte
  aligned offset in it. The engine pushes views of the bucket straight into its
  ``WeightSync`` (R1..R4), then answers ``ack``: the trainer refills a bucket only once
  the engine has finished reading it. A bucket is read only while its trainer runs
  (memory a dead process exported over CUDA IPC is not to be touched).
- **C5** ``end``, or ``abort`` when the trainer's iterator raised.

The engine never waits forever: a trainer process that is gone (closed connection, or a
pid that no longer runs) or silent for ``timeout_s`` in the middle of a push fails the
push with ``SenderDiedError``; every uncommitted layer keeps its old weights.
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Iterable, Iterator

import torch
from torch.multiprocessing.reductions import reduce_tensor

from ..errors import LoadError, PushError
from ..trace import failure
from ..watchdog import Watchdog
from .sync import SyncReport, WeightSync
from .transport import STALL_WARNING_S, SenderAbortedError

DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_TIMEOUT_S = 300.0     # silence mid-push before the peer counts as gone
_POLL_S = 0.5                 # how often a waiting side checks that its peer still runs
_ALIGN = 64


class SenderDiedError(PushError):
    """The trainer process died, closed its connection or went silent mid-push.

    Layers not in ``committed`` keep their old weights."""


class ReceiverDiedError(LoadError):
    """The engine closed its connection or stopped answering while the trainer waited."""


@dataclass
class _Bucket:
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


def _alive(pid: int) -> bool:
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


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    """Reads or writes of a bucket queued on ``device`` are done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """

    def __init__(self, conn: Connection, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 buckets: int = 2, device=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2 (one filled while one is read), got "
                             f"{buckets}")
        self.conn, self.bucket_bytes, self.timeout_s = conn, bucket_bytes, timeout_s
        self.device = torch.device(device) if device is not None else None
        self._buckets: list[_Bucket | None] = [None] * buckets
        self._busy: set[int] = set()          # buckets the engine has not acknowledged
        self._next = 0
        self.conn.send({"kind": "hello", "pid": os.getpid(),                         # C1
                        "pid_namespace": _pid_namespace()})

    @torch.no_grad()
    def __call__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                 version=None) -> int:
        """Send one push, stamped ``version`` on the engine; returns the bytes of tensor
        data sent, once the engine has read them all.

        Raises:
            ReceiverDiedError: the engine went away.
            Whatever the iterator raised, after telling the engine to roll back.
        """
        self.conn.send({"kind": "begin", "version": version})                        # C2
        self._next = 0      # the same layout fills the same buckets: each grows only once
        pending: list[tuple[str, torch.Tensor]] = []
        size = sent = 0
        try:
            for name, tensor in named_tensors:
                n = tensor.numel() * tensor.element_size()
                if pending and size + n > self.bucket_bytes:
                    sent += self._send_bucket(pending)
                    pending, size = [], 0
                pending.append((name, tensor.detach()))
                size += _aligned(n)
            if pending:
                sent += self._send_bucket(pending)
        except ReceiverDiedError:
            raise
        except BaseException as exc:
            try:
                self.conn.send({"kind": "abort", "reason": f"{type(exc).__name__}: {exc}"})
            except OSError:
                pass                  # the engine is gone too; the original error says why
            raise
        self.conn.send({"kind": "end"})                                              # C5
        while self._busy:
            self._take_ack()
        return sent

    def _send_bucket(self, tensors: list[tuple[str, torch.Tensor]]) -> int:
        index, self._next = self._next, (self._next + 1) % len(self._buckets)
        while index in self._busy:
            self._take_ack()
        entries, offset = [], 0
        for name, tensor in tensors:
            entries.append((name, tuple(tensor.shape), tensor.dtype, offset))
            offset += _aligned(tensor.numel() * tensor.element_size())
        bucket = self._bucket(index, offset, tensors[0][1].device)
        for (_, _, _, start), (_, tensor) in zip(entries, tensors):
            flat = tensor.reshape(-1).view(torch.uint8)
            bucket[start:start + flat.numel()].copy_(flat, non_blocking=True)
        _sync(bucket.device)
        self._busy.add(index)
        self.conn.send({"kind": "bucket", "index": index, "tensors": entries})       # C4
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def _bucket(self, index: int, size: int, first_device: torch.device) -> torch.Tensor:
        """Bucket ``index``, at least ``size`` bytes; made and shared (C3) when it is new
        or too small."""
        held = self._buckets[index]
        if held is not None and held.tensor.numel() >= size:
            return held.tensor
        if held is not None:
            held.close()
        device = self.device or first_device
        size = max(size, _aligned(self.bucket_bytes))
        if device.type == "cuda":
            tensor = torch.empty(size, dtype=torch.uint8, device=device)
            self._buckets[index] = _Bucket(tensor)
            self.conn.send({"kind": "share", "index": index, "size": size,
                            "cuda": reduce_tensor(tensor)})
        else:
            fd = os.memfd_create(f"loadfsm-bucket-{index}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mapping = mmap.mmap(fd, size)
                self.conn.send({"kind": "share", "index": index, "size": size, "cuda": None})
                send_handle(self.conn, fd, 0)
            finally:
                os.close(fd)
            self._buckets[index] = _Bucket(torch.frombuffer(mapping, dtype=torch.uint8),
                                           mapping)
        return self._buckets[index].tensor

    def _take_ack(self) -> None:
        if not self.conn.poll(self.timeout_s):
            raise ReceiverDiedError(f"the engine did not acknowledge a bucket within "
                                    f"{self.timeout_s} s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise ReceiverDiedError(f"the engine closed its connection: {exc!r}") from exc
        self._busy.discard(message["index"])

    def close(self) -> None:
        """Free the buckets (an engine still mapping one keeps it until it closes)."""
        for bucket in self._buckets:
            if bucket is not None:
                bucket.close()
        self._buckets = [None] * len(self._buckets)


class ColocatedReceiver:
    """Engine side: applies the trainer's pushes from shared buckets, in place.

    Args:
        sync: the engine's ``WeightSync``.
        conn: the other end of the sender's connection.
        timeout_s: seconds of silence in the middle of a push before the trainer counts
            as gone (``SenderDiedError``); between pushes the engine waits as long as
            the trainer process lives.
        stall_warning_s: as ``WeightReceiver``'s: a ``push_stalled`` warning after that
            long without a tensor while a layer waits for pieces; ``None``: off.
    """

    def __init__(self, sync: WeightSync, conn: Connection, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 stall_warning_s: float | None = STALL_WARNING_S):
        self.sync, self.conn = sync, conn
        self.timeout_s, self.stall_warning_s = timeout_s, stall_warning_s
        self.buckets: dict[int, _Bucket] = {}
        self.buckets_opened = 0       # shared handles opened: once per bucket, not per push
        self._pid: int | None = None

    def receive(self) -> SyncReport:
        """Wait for the next push and apply it (``WeightSync.push`` with the trainer's
        version); returns the ``SyncReport``.

        Raises:
            SenderDiedError: the trainer went away, before or during the push; layers
                not in ``committed`` keep their old weights. The connection is done:
                a new trainer connects to a new receiver on the same ``sync``.
            PushError: as ``WeightSync.push``; the rest of the push is still read (and
                acknowledged) so the trainer is not left waiting.
        """
        try:
            begin = self._recv(None, expect=("begin",))
        except SenderDiedError as exc:
            self.sync.session.tracer.event("push_failed", **failure(exc, committed=[]))
            raise
        arrivals = self.arrivals()
        try:
            with Watchdog(self.sync.session, self.stall_warning_s, "push"):
                return self.sync.push(arrivals, version=begin["version"])
        except PushError as exc:
            if isinstance(exc.__cause__, SenderDiedError):
                raise SenderDiedError(str(exc), committed=exc.committed, tensor=exc.tensor,
                                      layer=exc.layer) from exc.__cause__
            try:
                collections.deque(arrivals, maxlen=0)   # read to the end, acknowledging
            except SenderDiedError:
                pass                                    # the next receive() reports it
            raise

    def arrivals(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` views of each shared bucket of the push under way,
        until its end message; each bucket is acknowledged once its views were used.

        Raises:
            SenderAbortedError: the trainer's iterator raised mid-push.
            SenderDiedError: the trainer went away mid-push.
        """
        while True:
            message = self._recv(self.timeout_s, expect=("share", "bucket", "end", "abort"))
            kind = message["kind"]
            if kind == "end":
                return
            if kind == "abort":
                raise SenderAbortedError(f"sender aborted the push: {message['reason']}")
            if kind == "share":
                self._open(message)
                continue
            self._check_alive()
            bucket = self.buckets[message["index"]].tensor
            for name, shape, dtype, offset in message["tensors"]:
                n = math.prod(shape) * dtype.itemsize
                yield name, bucket[offset:offset + n].view(dtype).view(shape)
            del bucket
            _sync(self.sync.device)     # every read of the bucket has run
            self.conn.send({"kind": "ack", "index": message["index"]})

    def _open(self, message: dict) -> None:
        """C3: map a bucket once; it is reused by every later push."""
        old = self.buckets.pop(message["index"], None)
        if old is not None:
            old.close()
        if message["cuda"] is not None:
            rebuild, args = message["cuda"]
            self.buckets[message["index"]] = _Bucket(rebuild(*args))
        else:
            try:
                fd = recv_handle(self.conn)
            except (EOFError, OSError, RuntimeError) as exc:     # the trainer died sharing
                raise SenderDiedError(f"the trainer went away while sharing bucket "
                                      f"{message['index']} ({exc!r})", committed=[]) from exc
            try:
                mapping = mmap.mmap(fd, message["size"])
            finally:
                os.close(fd)
            self.buckets[message["index"]] = _Bucket(
                torch.frombuffer(mapping, dtype=torch.uint8), mapping)
        self.buckets_opened += 1

    def _recv(self, timeout: float | None, expect: tuple[str, ...]) -> dict:
        """The next message of a kind in ``expect`` (a ``hello`` is taken on the way),
        checking every ``_POLL_S`` that the trainer still runs."""
        while True:
            start = time.monotonic()
            while not self.conn.poll(_POLL_S):
                self._check_alive()
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise SenderDiedError(f"no message from the trainer for {timeout} s "
                                          "in the middle of a push", committed=[])
            try:
                message = self.conn.recv()
            except (EOFError, OSError) as exc:
                raise SenderDiedError(f"the trainer closed its connection ({exc!r})",
                                      committed=[]) from exc
            if message["kind"] == "hello":
                # Another pid namespace (another container): the pid means nothing here;
                # the closed connection and the timeout still tell.
                ours = _pid_namespace()
                visible = ours is not None and message["pid_namespace"] == ours
                self._pid = message["pid"] if visible else None
                continue
            if message["kind"] not in expect:
                raise SenderDiedError(f"protocol out of step: got {message['kind']!r}, "
                                      f"expected one of {expect}", committed=[])
            return message

    def _check_alive(self) -> None:
        if self._pid is not None and not _alive(self._pid):
            raise SenderDiedError(f"the trainer process (pid {self._pid}) is gone",
                                  committed=[])

    def close(self) -> None:
        """Unmap the shared buckets."""
        for bucket in self.buckets.values():
            bucket.close()
        self.buckets.clear()
