"""Pre-quantized FP8: a checkpoint's FP8 weights and their scales, installed as they are.

Under an ``Fp8CheckpointConfig`` a linear (or stacked experts) whose checkpoint weights
are FP8 is planned with each FP8 weight and its scale as pieces of one layer
(``plan_slots``): staging is FP8, so COMPLETE -> QUANTIZED assembles the kernel's scales
and the FP8 codes become the installed weights with no full-precision copy (unless the
user asked to requantize). A module the checkpoint keeps in full precision loads as it
is. The installed kernel module keeps the layout, so re-planning the loaded model (a
weight push) expects the same pieces: FP8 weights with their scales.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from ..errors import DtypeMismatchError, InvalidScaleError, ShapeMismatchError
from ..pieces import Piece
from ..quant.experts import StackedExperts
from ..quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from ..quant.fp8_layout import INPUT_SCALE, Fp8CheckpointConfig
from ..quant.prequantized import (PrequantizedFp8Linear, PrequantizedFp8StackedExperts,
                                  kernel_scale, scale_region, scale_slot_shape)
from .base import Handler, Install, own_parameters
from .registry import register_handler

class PrequantizedFp8Handler(Handler, abc.ABC):
    """Plans, checks and installs pre-quantized FP8 weights; subclasses say which
    attributes are the FP8 weights and which kernel module takes them."""

    makes_new_tensors = True
    weights: tuple[str, ...] = ()

    def layout(self, module: nn.Module, config) -> Fp8CheckpointConfig | None:
        """The checkpoint layout: the load's config, or the one a kernel module of this
        handler keeps (a re-planned model)."""
        if isinstance(module, self.installs):
            return module.layout
        return config if isinstance(config, Fp8CheckpointConfig) else None

    @staticmethod
    def scale_attr(weight: str, layout: Fp8CheckpointConfig) -> str:
        """The staging slot of ``weight``'s scales, named as the checkpoint names them
        (``weight_scale_inv``; ``gate_up_proj_scale_inv`` for stacked experts)."""
        return weight + layout.scale_name[len("weight"):]

    def plan_slots(self, name, module, config, pieces):
        layout = self.layout(module, config)
        if layout is None:
            return None
        prefix = f"{name}." if name else ""
        if not isinstance(module, self.installs) and not self._stored_fp8(name, prefix,
                                                                           layout, pieces):
            return None                           # kept in full precision by the checkpoint
        slots, extra = {}, []
        for attr, (shape, dtype) in _own_slots(module).items():
            if attr not in self.weights:
                slots[attr] = (shape, dtype)
                continue
            slots[attr] = (shape, FP8_DTYPE)
            weight_pieces = pieces.get(attr, [])
            per = _pieces_per_matrix(weight_pieces)
            scale = self.scale_attr(attr, layout)
            slots[scale] = (scale_slot_shape(layout, shape, per), torch.float32)
            inputs = self.input_attr(attr)
            if layout.input_scale_shape is not None:
                slots[inputs] = ((*shape[:-2], *((per,) if per > 1 else ()),
                                  *layout.input_scale_shape), torch.float32)
            for piece, index in _indexed(weight_pieces):
                ckpt = layout.scale_of(piece.ckpt_name)
                try:
                    region = scale_region(layout, piece.region, index, per, shape[-2])
                except ValueError as exc:
                    raise ShapeMismatchError(str(exc), tensor=ckpt, layer=name) from None
                extra.append(Piece(ckpt, prefix + scale, region, shard=piece.shard,
                                   expert=piece.expert))
                if layout.input_scale_shape is not None:
                    lead = () if _expert(piece) is None else (_expert(piece),)
                    extra.append(Piece(piece.ckpt_name[:-len("weight")] + INPUT_SCALE,
                                       prefix + inputs, lead + ((index,) if per > 1 else ()),
                                       shard=piece.shard, expert=piece.expert))
        return slots, extra

    @staticmethod
    def input_attr(weight: str) -> str:
        """The staging slot of static activation scales (read, checked, not used):
        ``input_scale`` beside a linear's ``weight``, as checkpoints name it."""
        return INPUT_SCALE if weight == "weight" else f"{weight}_{INPUT_SCALE}"

    def _stored_fp8(self, name, prefix, layout, pieces) -> bool:
        """Whether the checkpoint holds this module's weights in FP8: all (True), none
        (False), or some, which no layer can load (raises)."""
        names = [p.ckpt_name for attr in self.weights for p in pieces.get(attr, [])]
        names = names or [prefix + attr for attr in self.weights]
        plain = [n for n in names if layout.quantized and n not in layout.quantized]
        if plain and len(plain) < len(names):
            raise DtypeMismatchError("the checkpoint holds this piece in full precision "
                                     "beside FP8 pieces of the same layer",
                                     tensor=plain[0], layer=name)
        return not plain

    def quantize(self, rec, config) -> dict[str, torch.Tensor]:
        layout = self.layout(rec.module, config)
        if layout is None or rec.slots[self.weights[0]].dtype != FP8_DTYPE:
            return dict(rec.staging)
        results = {}
        folded = {name for w in self.weights
                  for name in (self.scale_attr(w, layout), self.input_attr(w))}
        for attr, tensor in rec.staging.items():
            if attr in self.weights:
                scale_attr = self.scale_attr(attr, layout)
                scale = rec.staging[scale_attr]
                _check_positive(rec, scale_attr, scale)
                scale = kernel_scale(layout, tensor, scale, _piece_rows(rec, attr, scale_attr))
                if layout.requantize is not None:
                    tensor, scale = quantize_fp8(
                        dequantize_fp8(tensor, scale, layout.stored, _out_dtype(rec.module)),
                        layout.requantize)
                results[attr], results[f"{attr}_scale"] = tensor, scale
            elif attr not in folded:
                results[attr] = tensor             # bias
        return results

    def install(self, rec, config) -> Install:
        layout = self.layout(rec.module, config)
        if layout is None or rec.slots[self.weights[0]].dtype != FP8_DTYPE:
            return Install(tensors=dict(rec.results))
        module = self.kernel(rec.results, layout.kernel, _out_dtype(rec.module))
        return Install(module=module, attrs={"layout": layout.for_pushes()})

    @abc.abstractmethod
    def kernel(self, results, config, out_dtype) -> nn.Module:
        """The kernel module holding ``results`` (each subclass's own)."""

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        if isinstance(rec.module, self.installs):
            return own_parameters(rec.module)
        return super().live_tensors(rec)


class PrequantizedLinearHandler(PrequantizedFp8Handler):
    """``nn.Linear`` -> ``PrequantizedFp8Linear``."""

    name = "fp8_prequantized"
    installs = (PrequantizedFp8Linear,)
    weights = ("weight",)

    def kernel(self, results, config, out_dtype):
        return PrequantizedFp8Linear.from_quantized(
            results["weight"], results["weight_scale"], results.get("bias"), config,
            out_dtype=out_dtype)


class PrequantizedExpertsHandler(PrequantizedFp8Handler):
    """``StackedExperts`` -> ``PrequantizedFp8StackedExperts`` (scales per expert)."""

    name = "fp8_prequantized_experts"
    installs = (PrequantizedFp8StackedExperts,)
    weights = ("gate_up_proj", "down_proj")

    def kernel(self, results, config, out_dtype):
        return PrequantizedFp8StackedExperts.from_quantized(
            results["gate_up_proj"], results["gate_up_proj_scale"], results["down_proj"],
            results["down_proj_scale"], config, out_dtype=out_dtype)


def _own_slots(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The module's weights and bias (on ``meta`` before a load; a kernel's after one,
    its scales left out: they are planned beside their weights)."""
    return {attr: (tuple(p.shape), p.dtype) for attr, p in module._parameters.items()
            if p is not None and not attr.endswith("_scale")}


def _out_dtype(module: nn.Module) -> torch.dtype:
    out = getattr(module, "out_dtype", None)
    return out if out is not None else next(iter(module.parameters())).dtype


def _expert(piece: Piece) -> int | None:
    return piece.region[0] if piece.region and isinstance(piece.region[0], int) else None


def _indexed(pieces: list[Piece]) -> list[tuple[Piece, int]]:
    """Each piece with its index among the pieces of its matrix (its expert's)."""
    seen: dict[int | None, int] = {}
    out = []
    for piece in pieces:
        key = _expert(piece)
        out.append((piece, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return out


def _pieces_per_matrix(pieces: list[Piece]) -> int:
    counts: dict[int | None, int] = {}
    for piece in pieces:
        counts[_expert(piece)] = counts.get(_expert(piece), 0) + 1
    return max(counts.values(), default=1)


def _scale_pieces(rec, scale_attr: str) -> list[Piece]:
    full = rec.slots[scale_attr].full_name
    return [piece for piece in rec.pieces.values() if piece.param == full]


def _piece_rows(rec, attr: str, scale_attr: str) -> list[slice]:
    """Rows of each weight piece of one matrix (the first expert's), in the order of
    their per-tensor scales; one whole-matrix range for a weight fed whole."""
    rows = rec.slots[attr].shape[-2]
    full = rec.slots[attr].full_name
    pieces = [p for p in rec.pieces.values() if p.param == full]
    first = [p for p in pieces if _expert(p) == _expert(pieces[0])] if pieces else []
    found = [p.region[-1] for p in first
             if p.region and isinstance(p.region[-1], slice)]
    return found or [slice(0, rows)]


def _check_positive(rec, scale_attr: str, scale: torch.Tensor) -> None:
    """A zero or negative scale makes its weight unusable: name the piece that holds one.
    NaN and Inf are the finiteness batch's (every arrival is checked there). A dry run
    (``meta`` staging) has no values to check."""
    if scale.is_meta or not bool((scale <= 0).any()):
        return
    for piece in _scale_pieces(rec, scale_attr):
        if bool((scale[piece.region] <= 0).any()):
            raise InvalidScaleError("FP8 scale holds zero or negative values",
                                    tensor=piece.ckpt_name, layer=rec.name)
    raise InvalidScaleError("FP8 scale holds zero or negative values",
                            tensor=rec.slots[scale_attr].full_name, layer=rec.name)


register_handler(PrequantizedLinearHandler(), modules=(nn.Linear,),
                 config=Fp8CheckpointConfig)
register_handler(PrequantizedExpertsHandler(), modules=(StackedExperts,),
                 config=Fp8CheckpointConfig)
