"""Engine side of the colocated transport (``colocated``): a trainer's pushes applied in
place from the shared buckets, steps C1..C5 (ARCHITECTURE.md)."""

from __future__ import annotations

import collections
import math
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
                        device_sync, pid_namespace, process_alive)
from .sync import SyncReport, WeightSync
from .transport import STALL_WARNING_S, SenderAbortedError


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
            device_sync(self.sync.device)     # every read of the bucket has run
            self.conn.send({"kind": "ack", "index": message["index"]})

    def _open(self, message: dict) -> None:
        """C3: map a bucket once; it is reused by every later push."""
        old = self.buckets.pop(message["index"], None)
        if old is not None:
            old.close()
        if message["cuda"] is not None:
            rebuild, args = message["cuda"]
            self.buckets[message["index"]] = SharedBucket(rebuild(*args))
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
            self.buckets[message["index"]] = SharedBucket(
                torch.frombuffer(mapping, dtype=torch.uint8), mapping)
        self.buckets_opened += 1

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
        """Unmap the shared buckets."""
        for bucket in self.buckets.values():
            bucket.close()
        self.buckets.clear()
