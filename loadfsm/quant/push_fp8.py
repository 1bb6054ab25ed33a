"""The trainer side of a pre-quantized push: quantize as the engine would, send half the bytes.

An engine loaded with online FP8 quantizes each layer the moment its bf16 weights
complete; a trainer that runs the same ``quantize_fp8`` on the same bf16 values gets the
same bytes. ``quantize_for_push`` does that for a trainer's model and yields what a
pre-quantized push carries, in checkpoint naming: each FP8 weight followed by its scale
(``weight_scale_inv`` for blocks, ``weight_scale`` otherwise), every other tensor as it is.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from loadfsm.pieces import Piece
from loadfsm.quant.config import Fp8Config
from loadfsm.quant.experts import StackedExperts
from loadfsm.quant.fp8 import quantize_fp8
from loadfsm.quant.fp8_layout import Fp8CheckpointConfig
from loadfsm.quant.prequantized import scale_region


def quantize_for_push(model: nn.Module, config: Fp8Config, *,
                      scale_name: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``model``'s parameters for ``WeightSync.push`` into an
    engine that loaded FP8 weights pre-quantized in ``config``'s layout.

    Every ``nn.Linear`` weight (and ``StackedExperts`` projection, one scale set per
    expert) ``config`` does not exclude is quantized whole with
    ``quantize_fp8`` (bit-identical to the engine quantizing the bf16 parameter), then
    split into the model's ``checkpoint_pieces`` (fused q/k/v give ``q_proj.weight`` ...
    with their rows of the scales; a per-tensor scale goes with each piece). A model
    without fused parameters (a transformers class) yields its own names. Per-tensor
    scales match the engine's only when the trainer's parameters are fused as the
    engine's are; per-channel and per-block scales match either way.

    Args:
        model: the trainer's model (bf16 parameters, any device).
        config: the engine's FP8 config.
        scale_name: the scale suffix the engine's checkpoint used, when not the default.
    """
    layout = Fp8CheckpointConfig.of(config, scale_name)
    quantized = {f"{name}.{attr}" if name else attr
                 for name, module in model.named_modules() if not config.excludes(name)
                 for attr in _weights(module)}
    custom = getattr(model, "checkpoint_pieces", None)
    by_param: dict[str, list[Piece]] = {}
    for piece in (custom() if callable(custom) else ()):
        by_param.setdefault(piece.param, []).append(piece)
    with torch.no_grad():
        for name, param in model.named_parameters():
            pieces = by_param.get(name, [])
            if name not in quantized:
                if not pieces:
                    yield name, param.detach()
                for piece in pieces:
                    yield piece.ckpt_name, param.detach()[piece.region]
                continue
            q, scale = quantize_fp8(param.detach(), config)
            if not pieces:
                yield name, q
                yield layout.scale_of(name), scale
            for piece in pieces:
                yield piece.ckpt_name, q[piece.region]
                yield layout.scale_of(piece.ckpt_name), scale[
                    scale_region(layout, piece.region, 0, 1, q.shape[-2])]


def _weights(module: nn.Module) -> tuple[str, ...]:
    """The attributes the engine's online FP8 quantizes: a linear's weight, stacked
    experts' two projections."""
    if isinstance(module, nn.Linear):
        return ("weight",)
    if isinstance(module, StackedExperts):
        return ("gate_up_proj", "down_proj")
    return ()
