"""Delta pushes over ``torch.distributed``: a trainer sends only what changed, and an
engine takes it only onto the weights it was computed against.

The trainer's ``DeltaSender`` sends what its ``DeltaPush`` gives (whole layers, or FP8
tiles with their scales) as one chain of the pipelined transport (``transport``; the
stream's order and head: ``delta_wire``). Every push carries a random id; a delta that is
not full names the push it is computed against, and an engine whose ``DeltaReceiver``
did not take exactly that push, or took another since (one that failed or was refused, a
push from elsewhere: the versions it stamped differ), refuses it with ``StaleDeltaError``
before any byte changes. Each push ends with every engine's outcome (D4): the trainer
keeps what it sent only when every engine took it, else it forgets, and its next push
goes whole. One sending rank; any number of engine ranks.
"""

from __future__ import annotations

import collections
import secrets
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LoadError, PushError
from ..loading.driver import indexed
from ..watchdog import Watchdog
from .chain import SenderAbortedError
from .colocated import ReceiverDiedError, SenderDiedError
from .delta import DeltaPush, DeltaReport
from .delta_wire import FAILED, HEAD_NAME, STALE, TAKEN, DeltaHead, encode_version
from .sync import SyncReport, WeightSync
from .tile_push import TileDelta, TilePatch, apply_tile_delta
from .transport import DEFAULT_BUCKET_BYTES, DEFAULT_BUFFERS, STALL_WARNING_S, WeightReceiver, \
    WeightSender
from .wire import WireError

__all__ = ["DeltaReceiver", "DeltaSender", "PushNotTakenError", "StaleDeltaError"]


class StaleDeltaError(PushError):
    """A delta push computed against weights this engine does not hold; nothing was
    changed (the trainer's next push goes whole)."""


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


class DeltaReceiver:
    """Engine side: receives a ``DeltaSender``'s pushes and applies them to ``sync``.

    Args:
        sync: the engine's ``WeightSync``.
        group, src, stall_warning_s, buffers: as ``WeightReceiver``'s (one sender).

    ``report``: the trainer's ``DeltaReport`` of the last push received (bytes skipped).
    ``holds``: the id of the last push this engine took, ``None`` when it holds no push
    a delta can build on (before the first, after one that failed). A delta is taken
    only onto that push, with ``sync.version`` and every layer's version as it left
    them: a push from elsewhere, even one that failed after committing some layers,
    stamps versions. Writes that bypass ``WeightSync`` are not seen: compare
    ``layer_checksums`` with the trainer's ``expected_checksums`` for those.
    """

    def __init__(self, sync: WeightSync, group=None, src: int = 0,
                 stall_warning_s: float | None = STALL_WARNING_S, *,
                 buffers: int = DEFAULT_BUFFERS):
        if not isinstance(src, int):
            raise ValueError(f"delta pushes come from one sender rank, got {src!r}")
        self.sync = sync
        self.receiver = WeightReceiver(sync, group, src, stall_warning_s, buffers=buffers)
        self.holds: int | None = None
        self._stamps: dict[str, object] = {}      # sync.layer_versions as ``holds`` left it
        self.report: DeltaReport | None = None

    def receive(self) -> SyncReport:
        """Receive one push and apply it, stamped with the trainer's version; the layers
        left out keep what they hold, which is what a full push would give them.

        Raises:
            StaleDeltaError: a delta computed against weights this engine does not hold;
                nothing changed.
            SenderDiedError: the trainer's process or link went away mid-push; layers not
                in ``committed`` keep their old weights. The group is unusable after it.
            PushError: as ``apply_tile_delta`` (a sender that raised: the cause is
                ``SenderAbortedError``); every layer wholly old or wholly new.
        """
        arrivals = _Arrivals(self.receiver.arrivals(), self.sync)
        try:
            report = self._apply(arrivals)
        except Exception as exc:
            if not arrivals.stopped:
                _drain(arrivals)
            if arrivals.lost and not isinstance(exc, SenderDiedError):
                raise _died(exc) from exc
            if not arrivals.stopped:      # else the collectives are out of step: no D4
                self._outcome(STALE if isinstance(exc, StaleDeltaError) else FAILED)
            raise
        self._outcome(TAKEN)
        return report

    def _apply(self, arrivals: "_Arrivals") -> SyncReport:
        try:
            head = _head(arrivals)                                                # D1
            self.report = head.report
            patches = [_patch(arrivals, indexed(self.sync.device))
                       for _ in range(head.patches)]                              # D2
        except SenderAbortedError as exc:
            raise PushError(f"push failed before a layer was touched: {exc}", committed=[],
                            tensor=exc.tensor, layer=exc.layer) from exc
        self._check_base(head, patches)
        self.holds = None             # from here on, the engine may hold part of the push
        with Watchdog(self.sync.session, self.receiver.stall_warning_s, "push"):
            report = apply_tile_delta(self.sync, TileDelta(arrivals, patches),     # D3
                                      version=head.version)
        self.holds, self._stamps = head.push_id, dict(self.sync.layer_versions)
        return report

    def _check_base(self, head: DeltaHead, patches: list[TilePatch]) -> None:
        sync = self.sync
        if head.full or (self.holds == head.base_id and sync.version == head.base_version
                         and sync.layer_versions == self._stamps):
            return
        held = ("no push a delta can build on" if self.holds is None
                else f"version {sync.version!r}" if sync.version != head.base_version
                else "layers another push stamped since: " + _listed(
                    [name for name, version in sync.layer_versions.items()
                     if self._stamps.get(name) != version]))
        raise StaleDeltaError(f"delta computed against version {head.base_version!r}, the "
                              f"engine holds {held}: refused, nothing changed",
                              committed=[], layer=patches[0].layer if patches else None)

    def _outcome(self, mine: int) -> None:
        """D4, the engine's side."""
        flag = torch.tensor([mine], dtype=torch.int64, device=self.receiver.ring.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.receiver.group)


class _Arrivals:
    """A receiver's arrivals, naming the tensor and layer in flight when the sender
    aborts or its link breaks. ``lost``: the link broke; ``stopped``: the chain cannot
    be followed further (lost, or a message that does not fit the protocol)."""

    def __init__(self, arrivals: Iterator[tuple[str, torch.Tensor]], sync: WeightSync):
        self._arrivals, self._sync = arrivals, sync
        self.last: str | None = None
        self.lost = self.stopped = False

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        try:
            name, tensor = next(self._arrivals)
        except SenderAbortedError as exc:
            raise SenderAbortedError(str(exc), **self._where()) from exc
        except WireError:
            self.stopped = True
            raise
        except RuntimeError as exc:          # gloo and NCCL report a lost peer so
            self.lost = self.stopped = True
            raise SenderDiedError(f"lost the sender mid-push: {exc}", committed=[],
                                  **self._where()) from exc
        self.last = name
        return name, tensor

    def _where(self) -> dict:
        name = self.last
        if name is None or name == HEAD_NAME:
            return {}
        route = self._sync._routes.table.get(name)
        return {"tensor": name,
                "layer": route.rec.name if route is not None else name.rpartition(".")[0]}


def _head(arrivals: _Arrivals) -> DeltaHead:
    """D1. A push without a delta head (a plain ``WeightSender``, another loadfsm) is
    received to its end; its sender takes no part in D4, so none follows."""
    name, tensor = next(arrivals, (None, None))
    try:
        if name != HEAD_NAME or tensor.dtype != torch.uint8:
            raise WireError("the push does not open with a delta head: the trainer sends "
                            "with a plain WeightSender, or runs another loadfsm")
        return DeltaHead.decode(tensor.cpu().numpy().tobytes())
    except WireError:
        _drain(arrivals)
        arrivals.stopped = True
        raise


def _patch(arrivals: _Arrivals, device: torch.device) -> TilePatch:
    """D2: one patch's three tensors, copied out of the ring (it turns over while the
    whole layers stream in)."""
    parts = [next(arrivals, None) for _ in range(3)]
    if None in parts or len({name for name, _ in parts}) != 1:
        raise WireError("a tile patch's index, tiles and scales did not arrive together")
    (name, index), (_, tiles), (_, scales) = parts
    layer, _, attr = name.rpartition(".")
    return TilePatch(layer, attr, *(t.to(device, copy=True) for t in (index, tiles, scales)))


def _listed(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _drain(arrivals: _Arrivals) -> None:
    """Receive the rest of a failed push and drop it: the collectives stay in step."""
    try:
        collections.deque(arrivals, maxlen=0)
    except (SenderAbortedError, SenderDiedError, WireError):
        pass                          # already failed; ``stopped`` says whether to go on


def _died(exc: Exception) -> SenderDiedError:
    """A push that failed on (or while draining after) a lost link, as a
    ``SenderDiedError`` naming what ``exc`` names."""
    return SenderDiedError(str(exc), committed=getattr(exc, "committed", []),
                           tensor=getattr(exc, "tensor", None),
                           layer=getattr(exc, "layer", None))
