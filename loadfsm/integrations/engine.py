"""The engine hook: an engine's own ``load_weights`` drives a ``LoadSession``.

    with torch.device("meta"):
        model = EngineModel(config)              # parameters carry ``weight_loader``s
    with loadfsm.LoadSession(model, quant="fp8", device="cuda") as session:
        model.load_weights(weights)              # the engine's code, unchanged
    session.report                               # every layer FINALIZED

The engine maps checkpoint names itself and calls
``param.weight_loader(param, loaded_weight[, shard_id][, expert_id=...])`` (vLLM's
convention). The steps, cited below as E1..E5:
  E1 enter: the ``weight_loader`` of every parameter the plan holds on ``meta`` (or the
     default loader, for parameters without one) is wrapped for the session's lifetime;
     the original objects stay in the hook, which the session owns;
  E2 a call names its piece by (parameter, shard id, expert id): an unknown shard id or
     a piece that already arrived raises before anything is written;
  E3 the layer materializes at its first call and the engine's loader runs on a
     Parameter over the staging tensor (same attributes as the engine's parameter), under
     a write tracker, so it writes into real memory;
  E4 the region written must be the piece's: a write outside the shard or the parameter
     raises; a parameter without shards written only in part (vocab padding, a TP rank's
     last rows) has the rest zero-filled; then the arrival fires, and the layer's last
     piece completes, quantizes and finalizes it;
  E5 exit: each wrapped parameter gets its original loader back (also when the load
     raised); parameters installed in full precision carry the engine's attributes
     (``weight_loader``, ``output_dim``...) as the meta ones did; quantized ones are new
     kernel tensors and carry none.

Reload (RL weight sync, ``WeightSync.push_with``): the engine calls ``load_weights``
again on the loaded model. The hook then wraps the *live* parameters (FP8 and full
precision alike) and runs the loaders the first load saw, kept in the session
(``LoadSession.engine_loaders``), since quantized parameters carry none. Each call first
tells the push (R1: a layer's first call fires ``reload``, FINALIZED -> META), then runs
E2..E4 on fresh staging; the layer's last piece quantizes it and the results are
committed in place (``sync``, P3..P5). E5 gives each live parameter back exactly the
``weight_loader`` attribute it had before (none, for FP8 ones).

Tensor parallelism needs nothing here: each rank builds its model with local shapes,
declares local shard layouts, and its loaders narrow the full checkpoint tensor (or a
lazy slice, see ``sources.safetensors_slices``) to the rank's part. Each rank's session
materializes and quantizes only that part.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import DuplicateWeightError, LoadError, ShapeMismatchError
from ..layer import LayerRecord
from ..states import LayerState
from .engine_shards import ShardId, piece_name
from .writes import (Box, WriteTracker, bounding_box, box_numel, box_text, box_within,
                     full_box, region_box, zero_outside)

if TYPE_CHECKING:
    from ..session import LoadSession
    from ..sync import PushProgress

_SHARD_ARGS = ("shard_id", "loaded_shard_id")
_MISSING = object()


class UnknownShardError(LoadError):
    """A loader call names a shard id or expert its parameter does not have."""

    def __init__(self, message: str, *, param: str, shard: ShardId, **where):
        super().__init__(message, **where)
        self.param, self.shard = param, shard


class ShardWriteError(LoadError):
    """A loader call wrote outside its shard or its parameter, or left part of it unwritten."""

    def __init__(self, message: str, *, param: str, shard: ShardId, **where):
        super().__init__(message, **where)
        self.param, self.shard = param, shard


def default_weight_loader(param: nn.Parameter, loaded_weight) -> None:
    """The loader of parameters that declare none: the whole tensor, same shape."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ShapeMismatchError(f"shape {tuple(loaded_weight.shape)} does not fit "
                                 f"{tuple(param.shape)}")
    param.data.copy_(loaded_weight)


@dataclass(eq=False)
class _Wrapped:
    """One parameter under the hook: where it goes and what to give back on exit."""

    param: nn.Parameter                    # the engine's meta parameter (live, on reload)
    rec: LayerRecord
    attr: str
    full: str
    loader: Callable                       # what the engine's call runs (E3)
    original: Any                          # its own attribute before E1, or _MISSING
    signature: inspect.Signature | None
    shard_params: tuple[str, ...]          # names its signature gives shard / expert ids
    expert_param: str | None
    engine_attrs: dict[str, Any] = field(default_factory=dict)


class EngineHook:
    """Turns ``weight_loader`` calls into arrivals of ``session``. Use it through
    ``LoadSession.__enter__`` / ``__exit__`` (first load) or ``WeightSync.push_with``
    (reload: ``push`` is the push in progress, told of every call)."""

    def __init__(self, session: "LoadSession", push: "PushProgress | None" = None):
        self.session = session
        self._push = push
        self._wrapped: list[_Wrapped] = []
        # piece names of each parameter, declared shards only: O(1) lookups per call
        self._sharded: dict[str, list[str]] = {}
        for rec in session.plan.layers.values():
            for name, piece in rec.pieces.items():
                if piece.shard is not None or piece.expert is not None:
                    self._sharded.setdefault(piece.param, []).append(name)

    def install(self) -> "EngineHook":                                          # E1
        reloading, seen = self._push is not None, self.session.engine_loaders
        for rec in self.session.plan.layers.values():
            for attr, slot in rec.slots.items():
                param = rec.module._parameters.get(attr)
                if slot.is_buffer or param is None or param.is_meta == reloading:
                    continue
                original = vars(param).get("weight_loader", _MISSING)
                own = (default_weight_loader if original is _MISSING else original,
                       {k: v for k, v in vars(param).items() if k != "weight_loader"})
                if reloading:     # FP8 parameters carry no loader: run what E1 saw
                    loader, engine_attrs = seen.get(slot.full_name, own)
                else:
                    loader, engine_attrs = seen[slot.full_name] = own
                signature = _signature(loader)
                shard_params, expert_param = _id_params(signature)
                w = _Wrapped(param, rec, attr, slot.full_name, loader, original, signature,
                             shard_params, expert_param, engine_attrs)
                self._wrapped.append(w)
                param.weight_loader = self._wrapper(w)
        return self

    def restore(self) -> None:                                                  # E5
        for w in self._wrapped:
            if w.original is _MISSING:
                del w.param.weight_loader
            else:
                w.param.weight_loader = w.original
            self._carry_attrs(w)
        self._wrapped.clear()

    def _carry_attrs(self, w: _Wrapped) -> None:
        live = w.rec.module._parameters.get(w.attr)
        if (live is None or live is w.param or live.is_meta or live.dtype != w.param.dtype
                or live.shape != w.param.shape):
            return
        for key, value in w.engine_attrs.items():
            setattr(live, key, value)
        if w.original is not _MISSING:
            live.weight_loader = w.original

    def _wrapper(self, w: _Wrapped) -> Callable:
        def weight_loader(param, loaded_weight, *args, **kwargs):
            if param is not w.param:
                raise TypeError(f"the weight_loader of {w.full} was called with another "
                                f"parameter")
            return self.load(w, loaded_weight, args, kwargs)

        return weight_loader

    # -- one call ----------------------------------------------------------------------
    def load(self, w: _Wrapped, loaded_weight, args: tuple, kwargs: dict) -> None:
        shard, expert = self._ids(w, args, kwargs)
        rec, session = w.rec, self.session
        label = piece_name(w.full, shard, expert)
        if self._push is not None:
            self._push.begin(rec, label)                                        # R1
        names = self._names(w, shard, expert)                                  # E2
        staging = session.stage(rec)[w.attr]                                    # E3
        target = nn.Parameter(staging, requires_grad=False)
        for key, value in w.engine_attrs.items():
            setattr(target, key, value)
        with WriteTracker(staging) as tracker:
            try:
                w.loader(target, loaded_weight, *args, **kwargs)
            except (RuntimeError, IndexError) as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                raise ShardWriteError(f"the weight_loader of {w.full} failed writing shard "
                                      f"{shard!r}: {exc}", param=w.full, shard=shard,
                                      tensor=label, layer=rec.name) from exc
        if target.data_ptr() != staging.data_ptr():
            raise ShardWriteError(f"the weight_loader of {w.full} replaced param.data "
                                  f"instead of writing into it", param=w.full, shard=shard,
                                  tensor=label, layer=rec.name)
        self._check_writes(w, staging, names, tracker.boxes, shard, label)      # E4
        nbytes = sum(math.prod(rec.shapes[n]) for n in names) * staging.element_size()
        session.arrive_in_place(rec, names, nbytes, piece=label, shard=shard, expert=expert)
        if self._push is not None:
            self._push.done(nbytes)

    def _ids(self, w: _Wrapped, args: tuple, kwargs: dict) -> tuple[ShardId, int | None]:
        if not w.shard_params and w.expert_param is None:
            return None, None
        try:
            bound = w.signature.bind_partial(None, None, *args, **kwargs)
        except TypeError:
            return None, None       # the engine's own loader will reject the call
        shard = next((bound.arguments[p] for p in w.shard_params if p in bound.arguments),
                     None)
        expert = bound.arguments.get(w.expert_param) if w.expert_param else None
        return shard, expert

    def _names(self, w: _Wrapped, shard: ShardId, expert: int | None) -> tuple[str, ...]:
        rec = w.rec
        name = piece_name(w.full, shard, expert)
        if name in rec.pieces:
            names: tuple[str, ...] = (name,)
        elif shard is None and expert is None and w.full in self._sharded:
            names = tuple(self._sharded[w.full])      # the fused tensor in one call
        else:
            have = sorted({str(rec.pieces[n].shard) for n in self._sharded.get(w.full, ())})
            raise UnknownShardError(
                f"{w.full} has no shard {shard!r}" + (f" of expert {expert}" if expert is not None
                                                      else "")
                + (f"; its shards are {', '.join(have)}" if have else "; it takes no shard id"),
                param=w.full, shard=shard, tensor=name, layer=rec.name)
        if any(n not in rec.missing for n in names):
            state = "" if rec.state is not LayerState.FINALIZED else " (layer finalized)"
            raise DuplicateWeightError(f"weight_loader called twice for {w.full} shard "
                                       f"{shard!r}{state}", tensor=name, layer=rec.name)
        return names

    def _check_writes(self, w: _Wrapped, staging: torch.Tensor, names: tuple[str, ...],
                      boxes: list[Box | None], shard: ShardId, label: str) -> None:
        rec = w.rec

        def fail(message: str) -> ShardWriteError:
            return ShardWriteError(f"the weight_loader of {w.full} (shard {shard!r}) "
                                   f"{message}", param=w.full, shard=shard, tensor=label,
                                   layer=rec.name)

        if not boxes:
            raise fail("wrote nothing into the parameter")
        if any(box is None for box in boxes):
            return      # a write no box describes (a transpose): inside the tensor, trusted
        shape = staging.shape
        allowed = [region_box(shape, rec.pieces[n].region) for n in names]
        if names == (w.full,) and not rec.pieces[w.full].region:
            written = bounding_box(boxes)        # no declared shards: the write says where
            if sum(box_numel(b) for b in boxes) < box_numel(written):
                raise fail(f"left gaps inside {box_text(written)}")
            if written != full_box(shape):
                zero_outside(staging, written)
                if not rec.reloading:
                    self.session.tracer.event("layer_padded", layer=rec.name, tensors=[w.full],
                                              written=box_text(written))
            return
        for box in boxes:
            if not any(box_within(box, a) for a in allowed):
                raise fail(f"wrote {box_text(box)}, outside its region "
                           f"{' + '.join(box_text(a) for a in allowed)}")
        if sum(box_numel(b) for b in boxes) < sum(box_numel(a) for a in allowed):
            raise fail(f"left part of {' + '.join(box_text(a) for a in allowed)} unwritten")


def _signature(loader: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(loader)
    except (TypeError, ValueError):
        return None


def _id_params(signature: inspect.Signature | None) -> tuple[tuple[str, ...], str | None]:
    """Which of the loader's parameters carry the shard id and the expert id."""
    params = signature.parameters if signature is not None else {}
    return (tuple(p for p in _SHARD_ARGS if p in params),
            "expert_id" if "expert_id" in params else None)
