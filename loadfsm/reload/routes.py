"""Names of pushed tensors: checkpoint names or the model's own parameter names.

A trainer pushes either what a checkpoint holds (``...q_proj.weight``, one tensor per
expert) or what its own copy of the model class yields from ``named_parameters()``
(``...qkv_proj.weight``, one tensor covering every piece of the fused parameter).
``PushRoutes`` resolves both to a layer in O(1), from one table built once per plan: a
push looks each name up and gets a ``Route`` made at planning time, never a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import UnexpectedWeightError
from ..layer import LayerRecord
from ..plan import Plan


@dataclass(frozen=True)
class Route:
    """Where one pushed name goes.

    ``param`` is ``None`` for a checkpoint name (``name`` is the planned piece);
    otherwise the tensor covers the whole parameter ``param``, i.e. ``pieces``.
    ``tied``: the name is one of several feeding one tied tensor (the first to
    arrive feeds it, as in a load).
    """

    rec: LayerRecord
    name: str
    param: str | None = None
    pieces: tuple[str, ...] = ()
    tied: bool = False


class PushRoutes:
    """Resolves pushed names against a session's plan. Built once: O(pieces).

    Checkpoint names win over parameter names, then tied aliases, then parameter names;
    the one table holds each name's winner. A name that is both a checkpoint piece and
    its own parameter (a padded embedding's) is left out of it: ``resolve`` decides
    those by shape.
    """

    def __init__(self, plan: Plan):
        tied = set(plan.tied.values())
        by_param: dict[str, list[str]] = {}
        for rec in plan.layers.values():
            for name, piece in rec.pieces.items():
                by_param.setdefault(piece.param, []).append(name)
        self._params: dict[str, Route] = {}
        for rec in plan.layers.values():
            for slot in rec.slots.values():
                route = Route(rec, slot.full_name, slot.full_name,
                              tuple(by_param.get(slot.full_name, ())), bool(slot.aliases))
                for name in (slot.full_name, *slot.aliases):
                    self._params[name] = route
        self.table: dict[str, Route] = {n: r for n, r in self._params.items() if r.pieces}
        for alias, canonical in plan.tied.items():
            if canonical in plan.by_ckpt and alias not in plan.by_ckpt:
                self.table[alias] = Route(plan.by_ckpt[canonical], canonical, tied=True)
        self._by_shape: dict[str, tuple[Route, Route]] = {}
        for name, rec in plan.by_ckpt.items():
            piece, whole = rec.pieces[name], self._params.get(name)
            route = Route(rec, name, tied=name in tied)
            if whole is not None and piece.region and whole.param == piece.param:
                self.table.pop(name, None)
                self._by_shape[name] = (route, whole)
            else:
                self.table[name] = route

    def resolve(self, name: str, shape: tuple[int, ...] | None = None) -> Route:
        """The route of ``name``; checkpoint names win over parameter names.

        A name that is both (a padded embedding's) goes by ``shape``: the parameter's
        full shape means the whole parameter, padding rows included.

        Raises:
            UnexpectedWeightError: ``name`` is neither a planned checkpoint name, a tied
                alias, nor a parameter or persistent buffer of the model.
        """
        route = self.table.get(name)
        if route is not None:
            return route
        both = self._by_shape.get(name)
        if both is not None:
            piece_route, whole = both
            rec = whole.rec
            full = rec.slots[rec.slot_attr(whole.param)].shape
            return whole if shape is not None and tuple(shape) == tuple(full) else piece_route
        raise UnexpectedWeightError(
            "pushed tensor matches no checkpoint name or parameter of the model",
            names=[name], tensor=name)


def checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A materialized model's tensors in checkpoint naming: fused parameters split.

    Uses the model's ``checkpoint_pieces`` (views, no copies); every other parameter
    keeps its own name. What a fresh ``loadfsm.load`` of the model's weights reads.
    """
    params = dict(model.named_parameters())
    custom = getattr(model, "checkpoint_pieces", None)
    fed = set()
    for piece in (custom() if callable(custom) else ()):
        if piece.param in params:
            fed.add(piece.param)
            tensor = params[piece.param]
            yield piece.ckpt_name, (tensor[piece.region] if piece.region else tensor).detach()
    for name, tensor in params.items():
        if name not in fed:
            yield name, tensor.detach()
