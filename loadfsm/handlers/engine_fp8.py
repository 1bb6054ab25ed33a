"""Online FP8 for engine layers that keep their own kernel tensors (vLLM's convention).

An engine's linear or fused-MoE module runs FP8 itself (vLLM: ``quant_method.apply``),
with its tensor-parallel collectives in its own ``forward``; the module is never
swapped, so its forward keeps running. Two ways in:
- a module that names its FP8 weights in ``fp8_weights`` (attribute names): each becomes
  an FP8 parameter with a ``{attr}_scale`` parameter beside it, every other attribute
  (bias) is loaded as it is, and ``module.fp8_config`` is set to the config;
- an engine class loadfsm cannot edit registers an ``Fp8Layout``
  (``register_fp8_layout``), which also puts the results in the engine's kernel layout
  before they are installed or, on reload, copied in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..quant.config import Fp8Config
from .base import Install
from .fp8 import Fp8Handler
from .registry import register_handler


@dataclass(frozen=True)
class Fp8Layout:
    """How an engine class takes FP8 results.

    Args:
        weights: ``fn(module) -> attribute names`` quantized to FP8.
        arrange: ``fn(module, results, config) -> results`` in the engine's kernel layout
            (what is installed, and what a reload copies into the live tensors).
        attrs: ``fn(module, config) -> {name: value}``: plain attributes the installed
            module needs besides its tensors (vLLM's ``quant_method``).
        skip: ``fn(name, module) -> bool``: modules of the class left in full precision
            (routers, gates) besides those the config excludes.
    """

    weights: Callable[[nn.Module], tuple[str, ...]]
    arrange: Callable[[nn.Module, dict, object], dict]
    attrs: Callable[[nn.Module, object], dict]
    skip: Callable[[str, nn.Module], bool] = lambda name, module: False


class EngineFp8Handler(Fp8Handler):
    """FP8 through a registered ``Fp8Layout``."""

    name = "engine_fp8"

    def __init__(self, layout: Fp8Layout):
        self.layout = layout

    def weight_attrs(self, rec) -> tuple[str, ...]:
        return tuple(self.layout.weights(rec.module))

    def quantize(self, rec, config):
        return self.layout.arrange(rec.module, super().quantize(rec, config), config)

    def scale_checked(self, rec, config):
        return {}      # the layout may reshape or rename the scales: inputs are checked

    def install(self, rec, config) -> Install:
        return Install(tensors=dict(rec.results), attrs=self.layout.attrs(rec.module, config))


class Fp8WeightsHandler(Fp8Handler):
    """FP8 for a module that lists its FP8 weights in ``fp8_weights``."""

    name = "engine_fp8"

    def weight_attrs(self, rec) -> tuple[str, ...]:
        return tuple(rec.module.fp8_weights)

    def install(self, rec, config) -> Install:
        return Install(tensors=dict(rec.results), attrs={"fp8_config": config})


def register_fp8_layout(cls: type[nn.Module], layout: Fp8Layout) -> None:
    """``cls`` modules (and subclasses) are quantized online and installed by ``layout``."""
    register_handler(EngineFp8Handler(layout), modules=(cls,), config=Fp8Config,
                     subclasses=True, when=lambda name, module: not layout.skip(name, module))


register_handler(Fp8WeightsHandler(), config=Fp8Config,
                 when=lambda name, module: isinstance(getattr(module, "fp8_weights", None),
                                                      tuple))
