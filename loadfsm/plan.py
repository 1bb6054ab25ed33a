"""Planning: every layer and the exact pieces it expects, before any data is read.

The plan comes from the model alone (parameters on ``meta``, tied aliases, the
model's ``checkpoint_pieces``); ``match_entries`` then checks it against the
checkpoint's headers (names, shapes, dtypes) without reading tensor data.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import DtypeMismatchError, ShapeMismatchError
from .layer import LayerRecord, TensorSlot
from .pieces import Piece


@dataclass(frozen=True)
class TensorEntry:
    """What a checkpoint header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str | None = None

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass
class Plan:
    layers: dict[str, LayerRecord]                 # in model order
    by_ckpt: dict[str, LayerRecord]                # checkpoint name -> layer
    tied: dict[str, str] = field(default_factory=dict)  # alias ckpt name -> canonical
    tied_used: dict[str, str] = field(default_factory=dict)  # canonical -> alias that fed it

    def rekey(self, canonical: str, alias: str) -> LayerRecord:
        """Feed a tied tensor from its alias's checkpoint name (``lm_head.weight``)."""
        rec = self.by_ckpt.pop(canonical)
        rec.pieces[alias] = replace(rec.pieces.pop(canonical), ckpt_name=alias)
        rec.missing.discard(canonical)
        rec.missing.add(alias)
        self.by_ckpt[alias] = rec
        self.tied_used[canonical] = alias
        return rec


def is_kernel_module(module: nn.Module) -> bool:
    """Whether ``module`` says which full-precision slots feed it (``full_precision_slots``:
    a quantized module loadfsm installed). Asked of the class: an instance lookup of a
    missing name goes through ``nn.Module.__getattr__``, slow on 100k-layer plans."""
    return callable(getattr(type(module), "full_precision_slots", None))


def _loadable(module: nn.Module, kernel: bool) -> list:
    """What a checkpoint can feed: ``[(attr, tensor, shape, dtype, is_buffer)]``.

    Direct parameters and persistent buffers, unless the module says otherwise
    through ``full_precision_slots()`` (``kernel``: ``is_kernel_module``): an FP8
    module that loadfsm installed is fed the bf16 weights its FP8 tensors are made
    from (a weight push re-plans this way).
    """
    if kernel:
        return [(attr, getattr(module, attr), torch.Size(shape), dtype, False)
                for attr, (shape, dtype) in module.full_precision_slots().items()]
    found = [(attr, param, param.shape, param.dtype, False)
             for attr, param in module._parameters.items() if param is not None]
    if module._buffers:
        skip = module._non_persistent_buffers_set
        found += [(attr, buf, buf.shape, buf.dtype, True)
                  for attr, buf in module._buffers.items()
                  if buf is not None and attr not in skip]
    return found


_PAUSED = 1 << 30      # the oldest generation's threshold while a plan is built


@contextmanager
def _collector_paused():
    """Planning makes about fifteen long-lived objects per layer and no garbage; CPython's
    cyclic collector, run by allocation counts, would scan the whole heap three or four
    times over a 100k-layer plan to find nothing (half of its time). Its full passes wait
    for the build (the young generations still run), then the thresholds are as they
    were; a plan made inside another's pause leaves the pause to the outer one."""
    young, middle, oldest = gc.get_threshold()
    if oldest == _PAUSED:
        yield
        return
    gc.set_threshold(young, middle, _PAUSED)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, oldest)


def plan_layers(model: nn.Module, choose: Callable[[str, nn.Module], Any],
                pieces: Iterable[Piece] | None = None, config=None) -> Plan:
    """Build one ``LayerRecord`` per module that owns tensors to load. O(tensors).

    ``choose(name, module)`` gives each layer's handler; a handler may plan other slots
    than the module's own for ``config`` (``Handler.plan_slots``: a pre-quantized
    checkpoint feeds an FP8 weight and its scale), with the pieces that feed them.
    ``pieces``, when given, replaces the model's own ``checkpoint_pieces`` (an
    integration that maps names for a model class it does not own passes them here).
    """
    if pieces is None:
        custom = getattr(model, "checkpoint_pieces", None)
        pieces = custom() if callable(custom) else ()
    pieces = list(pieces)
    with _collector_paused():
        layers, slot_owner, tied = _plan_modules(model, choose, pieces, config)
        by_ckpt = _plan_pieces(slot_owner, tied, pieces)
    # A tied alias is a checkpoint name too: used only when its canonical is absent.
    tied = {alias: canonical for alias, canonical in tied.items() if canonical in by_ckpt}
    return Plan(layers, by_ckpt, tied)


def _plan_modules(model: nn.Module, choose, pieces: list[Piece], config):
    """The records, in model order, with their slots (``pieces`` gains the pieces that
    handlers plan); every slot by its full name; tied alias -> canonical name."""
    by_param: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_param.setdefault(piece.param, []).append(piece)
    first_name: dict[int, TensorSlot] = {}
    tied: dict[str, str] = {}
    layers: dict[str, LayerRecord] = {}
    slot_owner: dict[str, tuple[LayerRecord, TensorSlot]] = {}
    by_module: dict[int, LayerRecord] = {}
    kernel_class: dict[type, bool] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        seen = by_module.get(id(module))
        if seen is not None:            # a module shared by two parents: both names
            seen.names.append(mod_name)
        kernel = kernel_class.get(type(module))
        if kernel is None:
            kernel = kernel_class[type(module)] = is_kernel_module(module)
        if not (kernel or module._parameters or module._buffers):
            continue
        loadable = _loadable(module, kernel)
        if not loadable:
            continue
        handler = choose(mod_name, module)
        prefix = f"{mod_name}." if mod_name else ""
        planned = handler.plan_slots(mod_name, module, config, {
            attr: by_param.get(prefix + attr, []) for attr, *_ in loadable})
        if planned is not None:
            own, extra = planned
            pieces += extra
            loadable = [(attr, None, torch.Size(shape), dtype, False)
                        for attr, (shape, dtype) in own.items()]
        slots: dict[str, TensorSlot] = {}
        for attr, tensor, shape, dtype, is_buffer in loadable:
            full = prefix + attr
            canonical = first_name.get(id(tensor)) if tensor is not None else None
            if canonical is not None:
                if canonical.full_name != full:
                    canonical.aliases += (full,)
                    tied[full] = canonical.full_name
                continue
            slot = TensorSlot(attr, full, shape, dtype, is_buffer)
            if tensor is not None:
                first_name[id(tensor)] = slot
            slots[attr] = slot
        if slots:
            name = mod_name or "<root>"
            rec = layers[name] = by_module[id(module)] = LayerRecord(name, module, handler,
                                                                     slots)
            if mod_name:
                rec.names.append(mod_name)
            for slot in slots.values():
                slot_owner[slot.full_name] = (rec, slot)
    return layers, slot_owner, tied


def _plan_pieces(slot_owner: dict[str, tuple[LayerRecord, TensorSlot]],
                 tied: dict[str, str], pieces: list[Piece]) -> dict[str, LayerRecord]:
    """Give every slot its pieces: the named ones first, in their order, then one whole
    piece of the same name for each slot no piece names. Returns ckpt name -> layer."""
    by_ckpt: dict[str, LayerRecord] = {}
    named: set[str] = set()
    for piece in pieces:
        param = tied.get(piece.param, piece.param)
        if param not in slot_owner:
            raise ValueError(f"a piece names {piece.param!r}, which the model lacks")
        if param != piece.param:
            piece = Piece(piece.ckpt_name, param, piece.region, piece.shard,
                          piece.expert, piece.optional)
        _add_piece(by_ckpt, *slot_owner[param], piece)
        named.add(param)
    for full, (rec, slot) in slot_owner.items():
        if full not in named:
            _add_piece(by_ckpt, rec, slot, Piece(full, full))
    if named:                           # only named pieces can overlap
        for full, (_, slot) in slot_owner.items():
            if full in named and slot.covered > slot.numel:
                raise ValueError(f"pieces of {full} overlap: they cover "
                                 f"{slot.covered} elements of {slot.numel}")
    return by_ckpt


def _add_piece(by_ckpt, rec: LayerRecord, slot: TensorSlot, piece: Piece) -> None:
    if piece.ckpt_name in by_ckpt:
        raise ValueError(f"two pieces claim checkpoint tensor {piece.ckpt_name!r}")
    rec.pieces[piece.ckpt_name] = piece
    rec.missing.add(piece.ckpt_name)
    shape = tuple(slot.shape if not piece.region else piece.expected_shape(slot.shape))
    rec.shapes[piece.ckpt_name] = shape
    slot.covered += math.prod(shape)
    by_ckpt[piece.ckpt_name] = rec


def expected_shape(rec: LayerRecord, piece: Piece) -> tuple[int, ...]:
    """Shape a tensor must have to fill ``piece`` (cached at planning: O(1) per arrival)."""
    shape = rec.shapes.get(piece.ckpt_name) if piece.ckpt_name in rec.pieces else None
    if shape is not None and rec.pieces[piece.ckpt_name] == piece:
        return shape
    slot = rec.slots[rec.slot_attr(piece.param)]
    return tuple(slot.shape if not piece.region else piece.expected_shape(slot.shape))


def check_fits(rec: LayerRecord, piece: Piece, shape, dtype: torch.dtype,
               file: str | None) -> None:
    """Raise if a tensor of ``shape``/``dtype`` cannot fill ``piece``."""
    want = expected_shape(rec, piece)
    if tuple(shape) != want:
        raise ShapeMismatchError(f"shape {tuple(shape)} does not fit {piece.param}"
                                 f"{_region_text(piece)}, which needs {want}",
                                 tensor=piece.ckpt_name, file=file, layer=rec.name)
    target = rec.slots[rec.slot_attr(piece.param)].dtype
    if dtype != target and not (dtype.is_floating_point and target.is_floating_point
                                and target.itemsize > 1 and dtype.itemsize > 1):
        # Casting into or out of FP8 without its scales would silently corrupt values.
        raise DtypeMismatchError(f"dtype {dtype} cannot load into {target} {piece.param}",
                                 tensor=piece.ckpt_name, file=file, layer=rec.name)


def _region_text(piece: Piece) -> str:
    if not piece.region:
        return ""
    parts = [str(i) if isinstance(i, int) else f"{i.start}:{i.stop}" for i in piece.region]
    return f"[{', '.join(parts)}]"
