"""Online FP8: quantize each linear (and stacked experts) the moment it completes.

The layer's full-precision staging is complete; ``quantize`` gives the FP8 tensors and
their scales (per tensor, row or 128x128 block), and the staging is freed right after.
A first load installs the FP8 module in place of the plain one; a reload copies the new
FP8 tensors into the live ones, so captured CUDA graphs stay valid.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..quant.config import Fp8Config
from ..quant.experts import StackedExperts
from ..quant.fp8 import quantize_fp8, reference_kernels, warm_fp8_kernels
from ..quant.linear import Fp8Linear, Fp8StackedExperts
from .base import WHOLE_MATRIX, Install, WeightQuantizer
from .registry import register_handler


class Fp8Handler(WeightQuantizer):
    """Quantizes the layer's ``weight_attrs`` to FP8; every other tensor (bias) passes."""

    def prepare(self, config, device):
        warm_fp8_kernels(config, device)

    def unprepared(self):
        return reference_kernels()

    def scale_checked(self, rec, config):
        # scale = max|w| / 448 over its rows (fp8.py, convention 2): NaN/Inf reach it.
        rows = {"tensor": WHOLE_MATRIX, "channel": 1}.get(config.granularity)
        rows = config.block_size[0] if rows is None else rows
        return {attr: rows for attr in self.weight_attrs(rec)}

    def quantize_weight(self, tensor, config):
        return quantize_fp8(tensor, config)


class Fp8LinearHandler(Fp8Handler):
    """``nn.Linear`` -> ``Fp8Linear``."""

    name = "fp8"
    installs = (Fp8Linear,)
    weights = ("weight",)

    def install(self, rec, config) -> Install:
        res = rec.results
        return Install(module=Fp8Linear.from_quantized(
            res["weight"], res["weight_scale"], res.get("bias"), config,
            out_dtype=rec.slots["weight"].dtype))


class Fp8ExpertsHandler(Fp8Handler):
    """``StackedExperts`` -> ``Fp8StackedExperts`` (one scale set per expert)."""

    name = "fp8_experts"
    installs = (Fp8StackedExperts,)
    weights = ("gate_up_proj", "down_proj")
    kernel: ClassVar[type[Fp8StackedExperts]] = Fp8StackedExperts

    def install(self, rec, config) -> Install:
        res = rec.results
        return Install(module=self.kernel.from_quantized(
            res["gate_up_proj"], res["gate_up_proj_scale"], res["down_proj"],
            res["down_proj_scale"], config, out_dtype=rec.slots["gate_up_proj"].dtype))


register_handler(Fp8LinearHandler(), modules=(nn.Linear,), config=Fp8Config)
register_handler(Fp8ExpertsHandler(), modules=(StackedExperts,), config=Fp8Config)
