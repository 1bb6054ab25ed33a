"""The engine hook: an engine's own ``load_weights`` drives a ``LoadSession``.

    with torch.device("meta"):
        model = EngineModel(config)              # parameters carry ``weight_loader``s
    with loadfsm.LoadSession(model, quant="fp8", device="cuda") as session:
        model.load_weights(weights)              # the engine's code, unchanged
    session.report                               # every layer FINALIZED

The engine maps checkpoint names itself and calls
``param.weight_loader(param, loaded_weight[, shard_id][, expert_id=...])`` (vLLM's
convention). Each call is one arrival, in steps E1..E5 (ARCHITECTURE.md). The writes are
tracked exactly, whatever the loader does (``writes``); a write outside its shard or the
parameter, or rows left unwritten, raise ``ShardWriteError`` naming the parameter and the
rows. vLLM keeps its loader behind a property, whose deleter would set it to ``None``: E5
gives back the instance's own entries, whatever their names. On a push
(``WeightSync.push_with``) the hook wraps the *live* parameters and runs the loaders the
first load saw (``LoadSession.engine_loaders``), since quantized parameters carry none.

Tensor parallelism needs nothing here: each rank builds its model with local shapes,
declares local shard layouts, and its loaders narrow the full checkpoint tensor (or a
lazy slice, see ``sources.safetensors_slices``) to the rank's part. Each rank's session
materializes and quantizes only that part.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DuplicateWeightError, LoadError
from ..layer import LayerRecord
from ..loading.session import LoadSession
from ..reload.transaction import ReloadTransaction
from ..states import LayerState
from .engine_shards import ShardId, default_weight_loader, piece_name
from .writes import (WriteTracker, box_index, box_text, box_within, full_box, mask_box,
                     region_box, unwritten_rows, zero_outside)


_SHARD_ARGS = ("shard_id", "loaded_shard_id")
_LOADER_KEYS = ("weight_loader", "_weight_loader")


class UnknownShardError(LoadError):
    """A loader call names a shard id or expert its parameter does not have."""

    def __init__(self, message: str, *, param: str, shard: ShardId, **where):
        super().__init__(message, **where)
        self.param, self.shard = param, shard


class ShardWriteError(LoadError):
    """A loader call wrote outside its shard or its parameter, or left part of it unwritten
    (``rows``: which, as ``"dim 0 rows 1, 3"``)."""

    def __init__(self, message: str, *, param: str, shard: ShardId, rows: str | None = None,
                 **where):
        super().__init__(message, **where)
        self.param, self.shard, self.rows = param, shard, rows


@dataclass(eq=False)
class _Wrapped:
    """One parameter under the hook: where it goes and what to give back on exit."""

    param: nn.Parameter                    # the engine's meta parameter (live, on reload)
    rec: LayerRecord
    attr: str
    full: str
    loader: Callable                       # what the engine's call runs (E3)
    original: dict[str, Any]               # its own loader entries (``vars``) before E1
    signature: inspect.Signature | None
    shard_params: tuple[str, ...]          # names its signature gives shard / expert ids
    expert_param: str | None
    engine_attrs: dict[str, Any] = field(default_factory=dict)


class EngineHook:
    """Turns ``weight_loader`` calls into arrivals of ``session``. Use it through
    ``engine_load.EngineLoad`` (first load) or ``engine_load.push_with`` (reload:
    ``push`` is the reload transaction in progress, told of every call)."""

    def __init__(self, session: LoadSession, push: ReloadTransaction | None = None):
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
                # vLLM keeps the loader behind a property (``_weight_loader``): the
                # entries to give back are the instance's own, whatever their names.
                original = {k: v for k, v in vars(param).items() if k in _LOADER_KEYS}
                found = getattr(param, "weight_loader", None)
                own = (default_weight_loader if found is None else found,
                       {k: v for k, v in vars(param).items() if k not in _LOADER_KEYS})
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
            _give_back(w.param, w.original)
            self._carry(w)
        self._wrapped.clear()

    def _carry(self, w: _Wrapped) -> None:
        """The installed parameter takes the engine's class, attributes and loader object
        (vLLM's loaders call methods of their parameter's class; ``replace_parameter``
        keeps them on FP8 weights too), under every name it has."""
        live = w.rec.module._parameters.get(w.attr)
        if live is None or live is w.param or live.is_meta:
            return
        if type(live) is not type(w.param):
            live = _as_class(w.param, live.data, live.requires_grad)
            slot = w.rec.slots[w.attr]
            for full in [slot.full_name, *slot.aliases]:
                self.session.writer.set_tensor(full, live, is_buffer=False)
        vars(live).update(w.engine_attrs)
        _give_back(live, w.original)

    def _wrapper(self, w: _Wrapped) -> Callable:
        def weight_loader(param, loaded_weight, *args, **kwargs):
            if param is not w.param:
                raise TypeError(f"the weight_loader of {w.full} was called with another "
                                f"parameter")
            return self.load(w, loaded_weight, args, kwargs)   # vLLM reads ``success``

        return weight_loader

    # -- one call ----------------------------------------------------------------------
    def load(self, w: _Wrapped, loaded_weight, args: tuple, kwargs: dict):
        shard, expert = self._ids(w, args, kwargs)
        rec, session = w.rec, self.session
        label = piece_name(w.full, shard, expert)
        if self._push is not None:
            self._push.begin(rec, label)                                        # R1
        names = self._names(w, shard, expert)                                  # E2
        staging = session.driver.stage(rec)[w.attr]                             # E3
        target = _as_class(w.param, staging, False)     # its loader calls class methods
        vars(target).update(w.engine_attrs)
        with WriteTracker(staging) as tracker:
            try:
                result = w.loader(target, loaded_weight, *args, **kwargs)
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
        self._check_writes(w, staging, names, tracker, shard, label)            # E4
        nbytes = sum(math.prod(rec.shapes[n]) for n in names) * staging.element_size()
        session.driver.arrive_in_place(rec, names, nbytes, piece=label, shard=shard,
                                       expert=expert)
        if self._push is not None:
            self._push.done(nbytes)
        return result

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
                      tracker: WriteTracker, shard: ShardId, label: str) -> None:
        """E4: the call wrote exactly its pieces' regions (one box, checked in O(ndim);
        anything else element by element), or, for a parameter without declared shards,
        one gapless box whose outside is then zero-filled."""
        rec, shape = w.rec, staging.shape

        def fail(message: str, rows: str | None = None) -> ShardWriteError:
            return ShardWriteError(f"the weight_loader of {w.full} (shard {shard!r}) "
                                   f"{message}", param=w.full, shard=shard, tensor=label,
                                   layer=rec.name, rows=rows)

        allowed = [region_box(shape, rec.pieces[n].region) for n in names]
        whole = names == (w.full,) and not rec.pieces[w.full].region
        if tracker.mask is None and len(tracker.boxes) == 1 and len(names) == 1:
            box = written = tracker.boxes[0]
            if not whole and not box_within(box, allowed[0]):
                raise fail(f"wrote {box_text(box)}, outside its region {box_text(allowed[0])}")
            exact = whole or box == allowed[0]
        else:
            mask = tracker.written()
            written = mask_box(mask)
            if written is None:
                raise fail("wrote nothing into the parameter")
            if not whole:
                outside = mask.clone()
                for region in allowed:
                    outside[box_index(region)] = False
                stray = mask_box(outside)
                if stray is not None:
                    raise fail(f"wrote {box_text(stray)}, outside its region "
                               f"{' + '.join(box_text(a) for a in allowed)}")
            exact = all(bool(mask[box_index(a)].all())
                        for a in ([written] if whole else allowed))
        if not exact:
            mask = tracker.written()
            gaps = [a for a in ([written] if whole else allowed)
                    if not bool(mask[box_index(a)].all())]
            rows = unwritten_rows(mask, gaps[0])
            raise fail(f"left {rows} of {box_text(gaps[0])} unwritten", rows=rows)
        if whole and written != full_box(shape):
            zero_outside(staging, written)     # vocab padding, a TP rank's last rows
            if not self.session.driver.reloading:
                self.session.tracer.event("layer_padded", layer=rec.name, tensors=[w.full],
                                          written=box_text(written))


def _give_back(param: nn.Parameter, original: dict[str, Any]) -> None:
    """Exactly the loader entries ``param`` had: neither deleted through vLLM's property
    (which would set it to ``None``) nor left wrapped."""
    for key in _LOADER_KEYS:
        vars(param).pop(key, None)
    vars(param).update(original)


def _as_class(like: nn.Parameter, data: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A parameter of ``like``'s class over ``data`` (no ``__init__``: its attributes are
    copied by the caller)."""
    return torch.Tensor._make_subclass(type(like), data, requires_grad)


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

