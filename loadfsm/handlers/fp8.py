"""Online FP8: quantize each linear (and stacked experts) the moment it completes.

Steps (cited in comments as Q1..Q3):
  Q1 the layer's bf16 staging is complete; amax per tensor/row/block gives the
     scales (NaN/Inf were recorded per piece at arrival; the session verifies them);
  Q2 quantize to float8_e4m3fn; the session frees the staging right after;
  Q3 install: swap the module for its FP8 form (first load), or copy into the
     live FP8 tensors in place (reload), so captured CUDA graphs stay valid.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.config import Fp8Config
from ..quant.experts import StackedExperts
from ..quant.fp8 import quantize_fp8
from ..quant.linear import Fp8Linear, Fp8StackedExperts
from .base import Handler, register_handler
from .kernels import installer_of

_NAMES = {"tensor": "fp8", "channel": "fp8-channel", "block": "fp8-block"}


def quant_name(config: Fp8Config | None) -> str | None:
    return None if config is None else _NAMES[config.granularity]


# Weight attributes to quantize, per plain module class; everything else passes through.
# Exact classes: a subclass may change ``forward`` in ways the FP8 module would not keep.
_QUANTIZED = {nn.Linear: ("weight",), StackedExperts: ("gate_up_proj", "down_proj")}


@register_handler("fp8")
class Fp8Handler(Handler):
    """Claims ``nn.Linear`` and ``StackedExperts`` layers not excluded by the config.

    A kernel module a registered handler installed (``installs``) goes back to that
    handler, so a weight push into a loaded model re-plans onto the same handler.
    """

    makes_new_tensors = True
    installs = (Fp8Linear, Fp8StackedExperts)

    def claims(self, layer_name, module) -> bool:
        owner = installer_of(module)
        if owner is not None:
            return owner is type(self)
        return self.quantizes(module) and not self.session.quant.excludes(layer_name)

    def quantizes(self, module: nn.Module) -> bool:
        """Whether a plain (not yet FP8) module is of a kind this handler quantizes."""
        return type(module) in _QUANTIZED

    def quantize(self, rec) -> dict[str, torch.Tensor]:
        config = self.session.quant
        results = {}
        for attr, tensor in rec.staging.items():
            if attr in self.weight_attrs(rec):
                q, scale = quantize_fp8(tensor, config)                   # Q1, Q2
                results[attr], results[f"{attr}_scale"] = q, scale
            else:
                results[attr] = tensor
        return results

    def weight_attrs(self, rec) -> tuple[str, ...]:
        """The layer's tensors quantized to FP8; the others (bias) pass through."""
        return _QUANTIZED[_kind(rec.module)]

    def install(self, rec) -> None:                                       # Q3
        config, res = self.session.quant, rec.results
        if _kind(rec.module) is nn.Linear:
            dtype = rec.slots["weight"].dtype
            new = Fp8Linear.from_quantized(res["weight"], res["weight_scale"], res.get("bias"),
                                           config, out_dtype=dtype)
        else:
            dtype = rec.slots["gate_up_proj"].dtype
            new = Fp8StackedExperts.from_quantized(
                res["gate_up_proj"], res["gate_up_proj_scale"], res["down_proj"],
                res["down_proj_scale"], config, out_dtype=dtype)
        self.session.replace_module(rec, new)

    def live_tensors(self, rec) -> dict[str, torch.Tensor]:
        return dict(rec.module.named_parameters(recurse=False))


def _kind(module: nn.Module) -> type[nn.Module]:
    """The plain module class of a layer, also once its FP8 module is installed."""
    if isinstance(module, Fp8Linear):
        return nn.Linear
    return StackedExperts if isinstance(module, StackedExperts) else type(module)
