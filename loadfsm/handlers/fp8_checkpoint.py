"""Pre-quantized FP8: a checkpoint's FP8 weight and its scale, installed as they are.

Under an ``Fp8CheckpointConfig`` a linear whose checkpoint weight is FP8 is planned as
two pieces of one layer, the FP8 weight and its scale (``plan_slots``): staging is FP8,
so COMPLETE -> QUANTIZED assembles the kernel's scale and the FP8 codes become the
installed weight with no full-precision copy (unless the user asked to requantize). A
linear the checkpoint keeps in full precision loads as it is. The installed
``PrequantizedFp8Linear`` keeps the layout, so re-planning the loaded model (a weight
push) expects the same pieces: FP8 weights with their scales.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DtypeMismatchError, InvalidScaleError, ShapeMismatchError
from ..pieces import Piece
from ..quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from ..quant.fp8_layout import INPUT_SCALE, Fp8CheckpointConfig
from ..quant.prequantized import (PrequantizedFp8Linear, kernel_scale, scale_region,
                                  scale_slot_shape)
from .base import Handler, Install
from .registry import register_handler


class PrequantizedFp8Handler(Handler):
    """``nn.Linear`` fed an FP8 weight and its scale -> ``PrequantizedFp8Linear``."""

    name = "fp8_prequantized"
    installs = (PrequantizedFp8Linear,)
    makes_new_tensors = True

    @staticmethod
    def layout(module: nn.Module, config) -> Fp8CheckpointConfig | None:
        if isinstance(module, PrequantizedFp8Linear):
            return module.layout
        return config if isinstance(config, Fp8CheckpointConfig) else None

    def plan_slots(self, name, module, config, pieces):
        layout = self.layout(module, config)
        if layout is None:
            return None
        prefix = f"{name}." if name else ""
        weight_pieces = pieces.get("weight", [])
        if not isinstance(module, PrequantizedFp8Linear):
            names = [p.ckpt_name for p in weight_pieces] or [prefix + "weight"]
            plain = [n for n in names if layout.quantized and n not in layout.quantized]
            if len(plain) == len(names):
                return None                       # kept in full precision by the checkpoint
            if plain:
                raise DtypeMismatchError("the checkpoint holds this piece in full precision "
                                         "beside FP8 pieces of the same layer",
                                         tensor=plain[0], layer=name)
        shape = tuple(module.weight.shape)
        count = max(1, len(weight_pieces))
        slots = {"weight": (shape, FP8_DTYPE),
                 layout.scale_name: (scale_slot_shape(layout, shape, count), torch.float32)}
        if module.bias is not None:
            slots["bias"] = (tuple(module.bias.shape), module.bias.dtype)
        inputs = layout.input_scale_shape
        if inputs is not None:
            slots[INPUT_SCALE] = ((count, *inputs) if count > 1 else inputs, torch.float32)
        extra = []
        for i, piece in enumerate(weight_pieces):
            try:
                region = scale_region(layout, piece.region, i, count, shape[0])
            except ValueError as exc:
                raise ShapeMismatchError(str(exc), tensor=layout.scale_of(piece.ckpt_name),
                                         layer=name) from None
            extra.append(Piece(layout.scale_of(piece.ckpt_name), prefix + layout.scale_name,
                               region, shard=piece.shard))
            if inputs is not None:
                extra.append(Piece(piece.ckpt_name[:-len("weight")] + INPUT_SCALE,
                                   prefix + INPUT_SCALE, (i,) if count > 1 else (),
                                   shard=piece.shard))
        return slots, extra

    def quantize(self, rec, config) -> dict[str, torch.Tensor]:
        layout = self.layout(rec.module, config)
        if layout is None or layout.scale_name not in rec.slots:
            return dict(rec.staging)
        q, scale = rec.staging["weight"], rec.staging[layout.scale_name]
        _check_positive(rec, layout, scale)
        scale = kernel_scale(layout, q, scale, _piece_rows(rec, layout))
        if layout.requantize is not None:
            out_dtype = _out_dtype(rec.module)
            q, scale = quantize_fp8(dequantize_fp8(q, scale, layout.stored, out_dtype),
                                    layout.requantize)
        results = {"weight": q, "weight_scale": scale}
        if "bias" in rec.staging:
            results["bias"] = rec.staging["bias"]
        return results

    def install(self, rec, config) -> Install:
        layout = self.layout(rec.module, config)
        if layout is None or layout.scale_name not in rec.slots:
            return Install(tensors=dict(rec.results))
        res = rec.results
        module = PrequantizedFp8Linear.from_quantized(
            res["weight"], res["weight_scale"], res.get("bias"), layout.kernel,
            out_dtype=_out_dtype(rec.module))
        return Install(module=module, attrs={"layout": layout.for_pushes()})

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        if isinstance(rec.module, PrequantizedFp8Linear):
            return dict(rec.module.named_parameters(recurse=False))
        return super().live_tensors(rec)


def _out_dtype(module: nn.Module) -> torch.dtype:
    return module.out_dtype if isinstance(module, PrequantizedFp8Linear) else module.weight.dtype


def _scale_pieces(rec, layout) -> list[Piece]:
    full = rec.slots[layout.scale_name].full_name
    return [piece for piece in rec.pieces.values() if piece.param == full]


def _piece_rows(rec, layout) -> list[slice]:
    """Rows of each weight piece, in the order of their per-tensor scales."""
    if layout.granularity != "tensor":
        return []
    rows = rec.slots["weight"].shape[0]
    found = []
    for piece in _scale_pieces(rec, layout):
        weight = rec.pieces.get(piece.ckpt_name[:-len(layout.scale_name)] + "weight")
        region = weight.region[0] if weight is not None and weight.region else slice(0, rows)
        found.append((piece.region[0] if piece.region else 0, region))
    return [region for _, region in sorted(found, key=lambda pair: pair[0])]


def _check_positive(rec, layout, scale: torch.Tensor) -> None:
    """A zero or negative scale makes its weight unusable: name the piece that holds one.
    NaN and Inf are the finiteness batch's (every piece's max|x| is checked there)."""
    if not bool((scale <= 0).any()):
        return
    for piece in _scale_pieces(rec, layout):
        if bool((scale[piece.region] <= 0).any()):
            raise InvalidScaleError("FP8 scale holds zero or negative values",
                                    tensor=piece.ckpt_name, layer=rec.name)
    raise InvalidScaleError("FP8 scale holds zero or negative values",
                            tensor=rec.slots[layout.scale_name].full_name, layer=rec.name)


register_handler(PrequantizedFp8Handler(), modules=(nn.Linear,), config=Fp8CheckpointConfig)
