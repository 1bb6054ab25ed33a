"""Delta pushes over ``torch.distributed``: a trainer sends only what changed, and an
engine takes it only onto the weights it was computed against.

The trainer's ``DeltaSender`` sends what its ``DeltaPush`` gives (whole layers, or FP8
tiles with their scales) as one chain of the pipelined transport (``transport``; the
stream's order and head: ``delta_wire``; the engine's side: ``delta_receiver``). Every
push carries a random id; a delta that is not full names the push it is computed
against, and an engine whose ``DeltaReceiver`` did not take exactly that push, or took
another since (one that failed or was refused, a push from elsewhere: the versions it
stamped differ), refuses it with ``StaleDeltaError`` before any byte changes. Each push
ends with every engine's outcome (D4): the trainer keeps what it sent only when every
engine took it, else it forgets, and its next push goes whole. One sending rank; any
number of engine ranks.
"""

from __future__ import annotations

import secrets
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LoadError
from .colocated import ReceiverDiedError
from .delta import DeltaPush, DeltaReport
from .delta_wire import FAILED, HEAD_NAME, STALE, TAKEN, DeltaHead, encode_version
from .tile_push import TileDelta
from .transport import DEFAULT_BUCKET_BYTES, DEFAULT_BUFFERS, WeightSender

__all__ = ["DeltaSender", "PushNotTakenError"]


class PushNotTakenError(LoadError):
    """An engine did not take a delta push (it failed, or refused a stale delta); the
    trainer forgot what it sent, so its next push goes whole."""


class DeltaSender:
    """Trainer side: sends ``delta``'s pushes over ``torch.distributed``.

    Args:
        delta: the trainer's ``DeltaPush`` (layers, or ``tiles=True``), planned from the
            engine's model class on ``meta``. The sender commits and forgets it.
        group, src, bucket_bytes, device, buffers: as ``WeightSender``'s (one sender).

    ``report``: the last push's ``DeltaReport`` (``bytes_skipped`` against a full push).
    """

    def __init__(self, delta: DeltaPush, group=None, src: int = 0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device=None, *,
                 buffers: int = DEFAULT_BUFFERS):
        self.delta = delta
        self.sender = WeightSender(group, src, bucket_bytes, device, buffers=buffers)
        self._base: tuple[int, object] | None = None   # (push id, version) engines hold
        self._push_id = 0
        self.report: DeltaReport | None = None

    def __call__(self, model: nn.Module, *, version=None) -> DeltaReport:
        """Send the delta of ``model``'s weights; every engine stamps ``version`` (None,
        an int or a str) on the layers it commits. Returns the ``DeltaReport``.

        Raises:
            PushNotTakenError: an engine failed to apply the push, or refused it as
                stale; the next push goes whole.
            ReceiverDiedError: an engine's process or link went away mid-push.
            Whatever computing the delta raised, after the engines rolled back.
        """
        encode_version(version)                       # a bad version: nothing is sent
        stream = _Outgoing(self._stream(model, version))
        try:
            self.sender(stream)
        except BaseException as exc:
            self._forget()
            if stream.raised is exc:                  # the engines were told: D4 follows
                self._outcome(FAILED)
            elif isinstance(exc, RuntimeError):       # gloo and NCCL report a lost peer so
                raise ReceiverDiedError(f"lost an engine mid-push: {exc}") from exc
            raise
        outcome = self._outcome(TAKEN)
        if outcome != TAKEN:
            self._forget()
            raise PushNotTakenError(
                "an engine refused the delta: it does not hold the push it was computed "
                "against; the next push goes whole" if outcome == STALE else
                "an engine failed to apply the push; the next push goes whole")
        self.delta.commit()
        self._base = (self._push_id, version)
        return self.report

    def _stream(self, model: nn.Module, version) -> Iterator[tuple[str, torch.Tensor]]:
        """D1..D3: the head, the patches, the whole layers."""
        if self._base is None:
            self.delta.forget()       # the engines hold nothing known: a full push
        delta = self.delta(model)
        items, patches = ((delta.items, delta.patches) if isinstance(delta, TileDelta)
                          else (delta, []))
        self.report = report = self.delta.report
        full = report.layers_skipped == 0 and report.tiles_sent == 0    # valid on any base
        base_id, base_version = (0, None) if full else self._base
        self._push_id = secrets.randbits(63) or 1
        yield HEAD_NAME, DeltaHead(full, base_id, self._push_id, base_version, version,
                                   len(patches), report).tensor()
        for patch in patches:
            yield from ((patch.name, patch.index), (patch.name, patch.tiles),
                        (patch.name, patch.scales))
        yield from items

    def _outcome(self, mine: int) -> int:
        """D4: the worst outcome over every rank of the group."""
        flag = torch.tensor([mine], dtype=torch.int64, device=self.sender.ring.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.sender.group)
        return int(flag.item())

    def _forget(self) -> None:
        self.delta.forget()
        self._base = None


class _Outgoing:
    """The sender's items, remembering an exception they raised: the transport then told
    the engines, and the push ends with D4 as any other."""

    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]):
        self._items, self.raised = items, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        try:
            return next(self._items)
        except StopIteration:
            raise
        except BaseException as exc:
            self.raised = exc
            raise
