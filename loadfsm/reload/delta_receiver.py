"""The engine's side of delta pushes over ``torch.distributed`` (``delta_transport`` has
the trainer's and the protocol): the head and tile patches first, checked against what
the engine holds, then the whole layers streamed into the push, the tiles written last.
"""

from __future__ import annotations

import collections
from typing import Iterator

import torch
import torch.distributed as dist

from ..errors import PushError
from ..loading.driver import indexed
from ..watchdog import Watchdog
from .chain import SenderAbortedError
from .colocated import SenderDiedError
from .delta import DeltaReport
from .delta_wire import FAILED, HEAD_NAME, STALE, TAKEN, DeltaHead
from .sync import SyncReport, WeightSync
from .tile_push import TileDelta, TilePatch, apply_tile_delta
from .transport import DEFAULT_BUFFERS, STALL_WARNING_S, WeightReceiver
from .wire import WireError

__all__ = ["DeltaReceiver", "StaleDeltaError"]


class StaleDeltaError(PushError):
    """A delta push computed against weights this engine does not hold; nothing was
    changed (the trainer's next push goes whole)."""


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
    stamps its version (give every push its own). Writes that bypass ``WeightSync``
    are not seen: compare ``layer_checksums`` with the trainer's ``expected_checksums``.
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
