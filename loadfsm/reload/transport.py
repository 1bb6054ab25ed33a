"""Weights over ``torch.distributed``: bucketed broadcast from a trainer to engines.

The trainer calls a ``WeightSender`` after its optimizer step
(``sender(model.named_parameters())``); every engine rank calls
``WeightReceiver.receive()``, which feeds the arrivals into its ``WeightSync``.

Wire protocol, per push: T1..T3 (ARCHITECTURE.md), all collectives on ``group``, rooted
at ``src``. Metadata goes by ``broadcast_object_list``, buckets by ``dist.broadcast``; if
the trainer's iterator raises, an abort message goes out instead of the end message, so
engines roll back rather than wait forever.

Buckets hold up to ``bucket_bytes``; a tensor larger than that travels alone. They live
on the CPU with gloo and on the current CUDA device with NCCL.
"""

from __future__ import annotations

import collections

import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from ..errors import LoadError, PushError
from .sync import SyncReport, WeightSync
from ..watchdog import Watchdog

DEFAULT_BUCKET_BYTES = 256 << 20
STALL_WARNING_S = 60.0       # a bucket of 256 MB takes well under a second on any link
_ALIGN = 64
_END, _ABORT, _BUCKET = "end", "abort", "bucket"


class SenderAbortedError(LoadError):
    """The trainer's push failed before it finished sending (its iterator raised)."""


def _comm_device(group) -> torch.device:
    """Where buckets and object messages live for the group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class WeightSender:
    """Trainer side: broadcasts named tensors in flattened buckets.

    Args:
        group: the process group (default: the world).
        src: global rank of the sender (this process).
        bucket_bytes: bytes per bucket; a tensor larger than that gets a bucket of its own.
        device: where buckets are packed; the current CUDA device for NCCL, else CPU.
    """

    def __init__(self, group=None, src: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device=None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        self.device = torch.device(device) if device is not None else None

    @torch.no_grad()
    def __call__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send one push; returns the bytes of tensor data sent.

        Raises:
            Whatever the iterator raised, after telling the receivers to roll back.
        """
        device = self.device or _comm_device(self.group)
        pending: list[tuple[str, torch.Tensor]] = []
        size = sent = 0
        iterator = iter(named_tensors)
        while True:
            try:
                item = next(iterator, None)
            except BaseException as exc:
                self._message({"kind": _ABORT, "reason": f"{type(exc).__name__}: {exc}"},
                              device)
                raise
            if item is None:
                break
            name, tensor = item
            n = tensor.numel() * tensor.element_size()
            if pending and size + n > self.bucket_bytes:
                sent += self._send_bucket(pending, device)
                pending, size = [], 0
            pending.append((name, tensor.detach()))
            size += _aligned(n)
        if pending:
            sent += self._send_bucket(pending, device)
        self._message({"kind": _END}, device)
        return sent

    def _send_bucket(self, tensors: list[tuple[str, torch.Tensor]], device) -> int:
        entries, offset = [], 0
        for name, tensor in tensors:
            entries.append((name, tuple(tensor.shape), tensor.dtype, offset))
            offset += _aligned(tensor.numel() * tensor.element_size())
        bucket = torch.empty(offset, dtype=torch.uint8, device=device)
        for (_, _, _, start), (_, tensor) in zip(entries, tensors):
            flat = tensor.reshape(-1).view(torch.uint8)
            bucket[start:start + flat.numel()].copy_(flat)
        self._message({"kind": _BUCKET, "size": offset, "tensors": entries}, device)  # T1
        dist.broadcast(bucket, self.src, group=self.group)                            # T2
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def _message(self, message: dict, device) -> None:
        dist.broadcast_object_list([message], src=self.src, group=self.group,
                                   device=device if device.type == "cuda" else None)


class WeightReceiver:
    """Engine side: receives the sender's buckets and pushes them into ``sync``.

    Args:
        sync: the engine's ``WeightSync``.
        group: the process group (default: the world).
        src: global rank of the sender.
        stall_warning_s: seconds without a tensor, once a push has begun, before a
            ``push_stalled`` warning names the layers in flight and the pieces each
            waits for (``loadfsm.watchdog``); ``None`` turns it off.
    """

    def __init__(self, sync: WeightSync, group=None, src: int = 0,
                 stall_warning_s: float | None = STALL_WARNING_S):
        self.sync, self.group, self.src = sync, group, src
        self.stall_warning_s = stall_warning_s

    def receive(self) -> SyncReport:
        """Receive one push and apply it; returns the ``SyncReport``.

        Raises:
            PushError: as ``WeightSync.push``; the rest of the push is still received
                (and dropped) so the collectives stay in step with the sender.
        """
        arrivals = self.arrivals()
        try:
            with Watchdog(self.sync.session, self.stall_warning_s, "push"):
                return self.sync.push(arrivals)
        except PushError:
            collections.deque(arrivals, maxlen=0)   # drain: stay in step with the sender
            raise

    def arrivals(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` views of each received bucket, until the end message.

        Raises:
            SenderAbortedError: the sender's iterator raised mid-push.
        """
        device = _comm_device(self.group)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=self.src, group=self.group,
                                       device=device if device.type == "cuda" else None)
            meta = message[0]
            if meta["kind"] == _END:
                return
            if meta["kind"] == _ABORT:
                raise SenderAbortedError(f"sender aborted the push: {meta['reason']}")
            bucket = torch.empty(meta["size"], dtype=torch.uint8, device=device)
            dist.broadcast(bucket, self.src, group=self.group)
            for name, shape, dtype, offset in meta["tensors"]:
                n = math.prod(shape) * dtype.itemsize
                yield name, bucket[offset:offset + n].view(dtype).view(shape)
