"""Planning a load: every layer with its handler and pieces, then the headers matched.

The plan comes from the model alone (``plan.plan_layers``, each module's handler from the
registry); ``match_headers`` checks it against the checkpoint's headers (names, shapes,
dtypes) before a byte of data is read, and gives the read order, layer by layer.
Engine models whose pieces are loader calls get them from a registered provider
(``register_piece_provider``: the engine integration registers one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import ModelStateError
from ..handlers.registry import handler_for, schemes_for
from ..pieces import Piece
from ..quant.fp8_layout import Fp8CheckpointConfig
from ..plan import Plan, TensorEntry, check_fits, is_kernel_module, plan_layers
from ..trace import Tracer

# (applies to model, pieces of model): the first provider that applies plans the pieces
_PIECE_PROVIDERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list]]] = []


def register_piece_provider(applies: Callable[[nn.Module], bool],
                            pieces: Callable[[nn.Module], list[Piece]]) -> None:
    """Models ``applies`` accepts (and that declare no ``checkpoint_pieces`` of their own)
    are planned with ``pieces(model)`` unless the caller passes pieces."""
    _PIECE_PROVIDERS.append((applies, pieces))


def default_pieces(model: nn.Module) -> list[Piece] | None:
    if hasattr(model, "checkpoint_pieces"):
        return None
    for applies, pieces in _PIECE_PROVIDERS:
        if applies(model):
            return pieces(model)
    return None


def plan_model(model: nn.Module, config, pieces: Iterable[Piece] | None) -> Plan:
    """Plan every layer of ``model`` under quant ``config``."""
    plan = plan_layers(model, lambda name, module: handler_for(name, module, config),
                       default_pieces(model) if pieces is None else pieces, config)
    _check_replannable(plan, config)
    _check_prequantized(plan, config)
    return plan


def _check_replannable(plan: Plan, config) -> None:
    """A kernel module (one that says which full-precision slots feed it) claimed by a
    handler that would load those tensors as they are would end up holding bf16 weights
    beside stale scales: refuse (a model loaded with FP8 or INT8, loaded again without)."""
    stale = [rec.name for rec in plan.layers.values()
             if is_kernel_module(rec.module)
             and (config is None or not rec.handler.makes_new_tensors)]
    if stale:
        kind = type(plan.layers[stale[0]].module).__name__
        raise ModelStateError(
            f"{len(stale)} layer(s) hold kernel modules ({kind}) from an earlier "
            f"quantized load that quant={config!r} cannot replace; "
            "build the model again on meta, or load it with the scheme that made them",
            layer=stale[0])


def _check_prequantized(plan: Plan, config) -> None:
    """A pre-quantized checkpoint into a layer no pre-quantized handler takes (stacked
    experts, an engine's own linear classes) would cast FP8 codes without their scales:
    refuse before reading, naming the layer and its class."""
    if not isinstance(config, Fp8CheckpointConfig):
        return
    online = config.kernel
    refused = [rec for rec in plan.layers.values()
               if not rec.handler.makes_new_tensors and not online.excludes(rec.name)
               and handler_for(rec.name, rec.module, online).makes_new_tensors]
    if refused:
        kind = type(refused[0].module).__name__
        raise ModelStateError(
            f"{len(refused)} layer(s) of a class no pre-quantized FP8 handler takes "
            f"({kind}) would be fed FP8 checkpoint tensors; load a bf16 checkpoint with "
            "online FP8, or register a handler for the class under Fp8CheckpointConfig",
            layer=refused[0].name)


def left_unquantized(plan: Plan, config) -> dict[str, list[str]]:
    """Layers ``config`` loads in full precision although another registered scheme would
    quantize them (an engine's linears, transformers' fused experts under INT8), by the
    schemes that would: a load says so rather than report a quantized model silently."""
    if config is None:
        return {}
    left: dict[str, list[str]] = {}
    for rec in plan.layers.values():
        if rec.handler.makes_new_tensors or config.excludes(rec.name):
            continue
        schemes = schemes_for(rec.name.replace("<root>", ""), rec.module)
        if schemes:
            left[rec.name] = sorted(scheme.__name__ for scheme in schemes)
    return left


def loaded_config(model: nn.Module):
    """The quant config a loaded model's kernel modules were made with (``None``: none).

    Raises:
        ValueError: the model mixes configs, still has ``meta`` tensors, or holds
            quantized (1-byte: FP8, int8, packed int4) parameters in modules that do not
            say what feeds them.
    """
    configs = {m.config for m in model.modules() if is_kernel_module(m)}
    if len(configs) > 1:
        raise ValueError(f"model mixes quant configs {configs}; cannot re-plan it")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("model still has tensors on meta; load it first")
    opaque = [name for name, module in model.named_modules()
              if not is_kernel_module(module)
              and any(p.dtype.itemsize == 1 and p.dtype != torch.bool
                      for p in module.parameters(recurse=False))]
    if opaque:
        raise ValueError(f"quantized parameters in modules that do not say what feeds them "
                         f"(no full_precision_slots): {opaque[:3]}; pass the load's "
                         f"session to WeightSync instead of re-planning")
    return next(iter(configs), None)


@dataclass
class Matched:
    """What the headers said: the read order, and the names the plan did not expect
    or that the checkpoint lacks (per layer)."""

    order: list[str]
    unexpected: list[str] = field(default_factory=list)
    absent: dict[str, list[str]] = field(default_factory=dict)


def match_headers(plan: Plan, entries: dict[str, TensorEntry], tracer: Tracer) -> Matched:
    """Check names, shapes and dtypes; a tied alias feeds its canonical when the
    canonical is absent; optional pieces the checkpoint lacks are defaulted. Layers that
    cannot complete are not read: they stay META, nothing half-loaded."""
    by_ckpt, unexpected = plan.by_ckpt, []
    for name, entry in entries.items():
        rec = by_ckpt.get(name)
        if rec is not None:
            check_fits(rec, rec.pieces[name], entry.shape, entry.dtype, entry.file)
        elif name in plan.tied:
            canonical = plan.tied[name]
            if canonical not in entries:
                rec = plan.rekey(canonical, name)
                tracer.event("tied_weight", alias=name, canonical=canonical, source="alias")
                check_fits(rec, rec.pieces[name], entry.shape, entry.dtype, entry.file)
        else:
            unexpected.append(name)
    absent: dict[str, list[str]] = {}
    for name in [n for n in by_ckpt if n not in entries]:
        rec = by_ckpt[name]
        if rec.pieces[name].optional:
            rec.missing.discard(name)
            rec.defaulted.append(name)
        else:
            absent.setdefault(rec.name, []).append(name)
    absent = {layer: sorted(names) for layer, names in absent.items()}
    order = [name for rec in plan.layers.values() if rec.name not in absent
             for name in rec.pieces if name in entries]
    return Matched(order, unexpected, absent)
