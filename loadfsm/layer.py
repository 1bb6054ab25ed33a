"""The per-layer record and the one machine that moves every record.

``transitions``' ``Machine.add_model`` scans its model list, so adding 100k
layers is quadratic. We build one class-level machine with no models and read
its moves once into a table that fires on plain records directly: planning is
O(layers), a trigger O(1) and one dict lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transitions import Machine

from .errors import IllegalTransitionError
from .pieces import Piece
from .states import TRANSITIONS, LayerState

LAYER_MACHINE = Machine(model=None, states=LayerState, transitions=TRANSITIONS,
                        initial=LayerState.META, auto_transitions=False)

# trigger -> {source -> destination}: the machine's own moves (the table has no conditions
# and no callbacks), so a trigger skips ``Event.trigger``'s per-call EventData and
# callback resolution and ``Machine.set_state``'s state lookups (2 us a move; the FSM is
# on every arrival of a load and a push).
_MOVES: dict[str, dict[LayerState, LayerState]] = {
    trigger: {LayerState[source]: LayerState[moves[0].dest]
              for source, moves in event.transitions.items()}
    for trigger, event in LAYER_MACHINE.events.items()}


@dataclass(eq=False)
class TensorSlot:
    """One parameter or persistent buffer a layer loads, as planned on ``meta``."""

    attr: str                      # name on the owning module (``weight``)
    full_name: str                 # name in the model (``model.norm.weight``)
    shape: torch.Size
    dtype: torch.dtype
    is_buffer: bool
    covered: int = 0               # elements the planned pieces fill; < numel means padding
    aliases: tuple[str, ...] = ()  # tied names sharing this tensor

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def padded(self) -> bool:
        return self.covered < self.numel


@dataclass(eq=False)
class LayerRecord:
    """Everything the session knows about one layer. A plain object, never the module.

    The record is the machine's model: ``state`` is set by the layer machine only.
    """

    name: str
    module: nn.Module
    handler: Any                   # the loadfsm.handlers Handler chosen for the module
    slots: dict[str, TensorSlot]
    pieces: dict[str, Piece] = field(default_factory=dict)        # ckpt name -> piece
    missing: set[str] = field(default_factory=set)                 # ckpt names still due
    state: LayerState = LayerState.META
    staging: dict[str, torch.Tensor] = field(default_factory=dict)  # attr -> full precision
    results: dict[str, torch.Tensor] = field(default_factory=dict)  # handler output
    staging_bytes: int = 0
    final_bytes: int = 0
    aliased: bool = False          # staging is the arriving tensor itself (see _can_alias)
    norms: list = field(default_factory=list)   # pending NaN/Inf checks (see finiteness)
    # what arrived since staging, in order (a ckpt name, or a tuple of names written at once):
    # the layer's NaN/Inf check at completion covers them and names the first bad one
    arrived: list = field(default_factory=list)
    # (tensor, FP8 values flushed to zero, nonzero inputs), counts on device, checked with norms
    underflow: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)   # every name the module is registered at
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ckpt name -> shape
    defaulted: list[str] = field(default_factory=list)
    attr_of: dict[str, str] = field(default_factory=dict)            # full name -> attr

    def __post_init__(self) -> None:
        self.attr_of = {slot.full_name: attr for attr, slot in self.slots.items()}

    def slot_attr(self, full_name: str) -> str:
        return self.attr_of[full_name]

    def fire(self, trigger: str) -> tuple[LayerState, LayerState]:
        """Move the record by ``trigger``; returns (src, dst). Illegal moves raise."""
        src = self.state
        moves = _MOVES.get(trigger)
        if moves is None:
            raise IllegalTransitionError(f"unknown trigger {trigger!r}", layer=self.name)
        dst = moves.get(src)
        if dst is None:
            raise IllegalTransitionError(
                f"trigger {trigger!r} is not allowed in state {src.name}", layer=self.name)
        self.state = dst
        return src, dst

    def required_missing(self) -> list[str]:
        """Checkpoint names still due that have no default, sorted."""
        return sorted(n for n in self.missing if not self.pieces[n].optional)
