"""INT8 weight-only (W8A16): quantize each linear (and stacked experts) when it completes.

A scheme is a config, a handler and a kernel module; nothing in the core knows this
one. ``quantize`` gives the int8 weights and their per-row scales (``quant.int8``), the
staging is freed right after; a first load installs ``Int8Linear`` (``Int8StackedExperts``)
in place of the plain module, a reload copies the new tensors into the live ones, and
re-planning a loaded model finds this handler again through ``installs``.
"""

from __future__ import annotations

from torch import nn

from ..quant.config import Int8Config
from ..quant.experts import StackedExperts
from ..quant.int8 import quantize_int8
from ..quant.int8_linear import Int8Linear, Int8StackedExperts
from .base import Install, WeightQuantizer
from .registry import register_handler


class Int8Handler(WeightQuantizer):
    """Quantizes the layer's ``weights`` to int8; every other tensor (bias) passes."""

    def quantize_weight(self, tensor, config):
        return quantize_int8(tensor)


class Int8LinearHandler(Int8Handler):
    """``nn.Linear`` -> ``Int8Linear``."""

    name = "int8"
    installs = (Int8Linear,)
    weights = ("weight",)

    def install(self, rec, config) -> Install:
        res = rec.results
        return Install(module=Int8Linear.from_quantized(
            res["weight"], res["weight_scale"], res.get("bias"), config))


class Int8ExpertsHandler(Int8Handler):
    """``StackedExperts`` -> ``Int8StackedExperts`` (per-row scales of every expert)."""

    name = "int8_experts"
    installs = (Int8StackedExperts,)
    weights = ("gate_up_proj", "down_proj")

    def install(self, rec, config) -> Install:
        res = rec.results
        return Install(module=Int8StackedExperts.from_quantized(
            res["gate_up_proj"], res["gate_up_proj_scale"], res["down_proj"],
            res["down_proj_scale"], config))


register_handler(Int8LinearHandler(), modules=(nn.Linear,), config=Int8Config)
register_handler(Int8ExpertsHandler(), modules=(StackedExperts,), config=Int8Config)
