"""Engine side of the colocated transport (``colocated``): a trainer's pushes applied in
place from the shared buckets and the trainer storages it shares directly
(``colocated_direct``), steps C1..C5 (ARCHITECTURE.md)."""

from __future__ import annotations

import collections
import mmap
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Iterator

import torch

from ..errors import PushError
from ..trace import failure
from ..watchdog import Watchdog
from .colocated import (DEFAULT_TIMEOUT_S, POLL_S, SenderDiedError, SharedBucket,
                        bucket_views, pid_namespace, process_alive)
from .colocated_direct import storage_view
from .sync import SyncReport, WeightSync
from .transport import STALL_WARNING_S, SenderAbortedError

ACK_POLL_S = 1e-4       # while the device still reads a bucket: how often to look for work


class _Ran:
    """The fence of reads that ran when they were issued (CPU)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        """Nothing to wait for: CPU reads are done when issued."""


def read_fence(device: torch.device):
    """Marks the reads queued so far on ``device``: ``query()`` says whether they ran."""
    if device.type != "cuda":
        return _Ran()
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


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
        self.buckets: dict[int, SharedBucket] = {}
        self.buckets_opened = 0       # shared handles opened: once per bucket, not per push
        self.direct: dict[int, SharedBucket] = {}   # trainer storages mapped, by id
        self.direct_opened = 0        # trainer storages mapped, all pushes
        self.tables_received = 0      # buckets whose table came (a new layout), all pushes
        # Per bucket of a push, in order: (bucket, its views), kept for the next push.
        self._layouts: list[tuple[int, list[tuple[str, torch.Tensor]]] | None] = []
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
        """Yield ``(name, tensor)`` views of each shared bucket and directly shared
        trainer storage of the push under way, until its end message. Each is
        acknowledged once the device ran every read of it; until then the next one's
        reads are queued behind, so the device never waits for this process
        (``_release``).

        Raises:
            SenderAbortedError: the trainer's iterator raised mid-push.
            SenderDiedError: the trainer went away mid-push.
        """
        reading: collections.deque = collections.deque()    # (ack, fence), oldest first
        position = 0
        while True:
            self._release(reading)
            message = self._recv(self.timeout_s, expect=("share", "bucket", "direct",
                                                         "drop", "end", "abort"))
            kind = message["kind"]
            if kind in ("end", "abort", "drop"):
                # The trainer's next push needs them; nothing unmapped may still be read.
                self._release(reading, wait=True)
            if kind == "end":
                return
            if kind == "abort":
                raise SenderAbortedError(f"sender aborted the push: {message['reason']}")
            if kind == "drop":
                for mapping in message["direct"]:
                    self.direct.pop(mapping).close()
                continue
            self._check_alive()          # a dead trainer's memory is neither mapped nor read
            if kind == "share":
                self._open(message)
                continue
            if kind == "direct":
                name, shape, stride, offset, dtype = message["tensor"]
                base = self.direct[message["id"]].tensor
                yield name, storage_view(base, dtype, shape, stride, offset)
                reading.append(({"kind": "ack", "lent": message["lent"]},
                                read_fence(self.sync.device)))
                continue
            index = message["index"]
            if message["tensors"] is not None:
                self._remember(position, index, message["tensors"])
            elif position >= len(self._layouts) or self._layouts[position] is None:
                raise SenderDiedError(f"protocol out of step: bucket {position} of the push "
                                      "came without its table", committed=[])
            yield from self._layouts[position][1]
            position += 1
            reading.append(({"kind": "ack", "index": index}, read_fence(self.sync.device)))

    def _remember(self, position: int, index: int, table: list) -> None:
        """Views of bucket ``index`` per ``table``, for this push and the next ones with
        the same layout."""
        views = bucket_views(self.buckets[index].tensor, table)
        self._layouts[position:position + 1] = [(index, [(entry[0], view) for entry, view
                                                         in zip(table, views)])]
        self.tables_received += 1

    def _release(self, reading: collections.deque, *, wait: bool = False) -> None:
        """Acknowledge, oldest first, the buckets and direct tensors whose reads ran.
        While the device still reads one, a message already here goes first (its reads
        queue behind); with none (or ``wait``), wait for the device: the trainer may
        need the bucket back."""
        while reading:
            ack, fence = reading[0]
            if not fence.query():
                if wait:
                    fence.synchronize()
                elif self.conn.poll(ACK_POLL_S):
                    return
                continue
            try:
                self.conn.send(ack)
            except OSError as exc:
                raise SenderDiedError(f"the trainer closed its connection ({exc!r})",
                                      committed=[]) from exc
            reading.popleft()

    def _open(self, message: dict) -> None:
        """C3: map a bucket or a trainer storage once; reused by every later push that
        reads it."""
        if "direct" in message:
            self.direct[message["direct"]] = self._map(message, f"storage {message['direct']}")
            self.direct_opened += 1
            return
        old = self.buckets.pop(message["index"], None)
        self._layouts = [None if layout is not None and layout[0] == message["index"]
                         else layout for layout in self._layouts]   # as the trainer does
        if old is not None:
            old.close()
        self.buckets[message["index"]] = self._map(message, f"bucket {message['index']}")
        self.buckets_opened += 1

    def _map(self, message: dict, what: str) -> SharedBucket:
        """The shared memory ``message`` hands over, as one uint8 tensor."""
        if message["cuda"] is not None:
            rebuild, args = message["cuda"]
            return SharedBucket(rebuild(*args))
        try:
            fd = recv_handle(self.conn)
        except (EOFError, OSError, RuntimeError) as exc:     # the trainer died sharing
            raise SenderDiedError(f"the trainer went away while sharing {what} ({exc!r})",
                                  committed=[]) from exc
        try:
            mapping = mmap.mmap(fd, message["size"])
        finally:
            os.close(fd)
        return SharedBucket(torch.frombuffer(mapping, dtype=torch.uint8), mapping)

    def _recv(self, timeout: float | None, expect: tuple[str, ...]) -> dict:
        """The next message of a kind in ``expect`` (a ``hello`` is taken on the way),
        checking every ``POLL_S`` that the trainer still runs."""
        while True:
            start = time.monotonic()
            while not self.conn.poll(POLL_S):
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
                ours = pid_namespace()
                visible = ours is not None and message["pid_namespace"] == ours
                self._pid = message["pid"] if visible else None
                continue
            if message["kind"] not in expect:
                raise SenderDiedError(f"protocol out of step: got {message['kind']!r}, "
                                      f"expected one of {expect}", committed=[])
            return message

    def _check_alive(self) -> None:
        if self._pid is not None and not process_alive(self._pid):
            raise SenderDiedError(f"the trainer process (pid {self._pid}) is gone",
                                  committed=[])

    def close(self) -> None:
        """Unmap the shared buckets and trainer storages."""
        self._layouts.clear()
        for shared in (*self.buckets.values(), *self.direct.values()):
            shared.close()
        self.buckets.clear()
        self.direct.clear()
