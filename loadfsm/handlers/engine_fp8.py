"""Online FP8 for engine layers that keep their own kernel tensors (vLLM's convention).

An engine's linear or fused-MoE module runs FP8 itself (vLLM: ``quant_method.apply``),
with its tensor-parallel collectives in its own ``forward``. Such a module names its FP8
weights in ``fp8_weights`` (attribute names) and takes the results in
``install_fp8(tensors, config)``: ``{attr: q, f"{attr}_scale": scale}`` for each FP8
weight, every other attribute (bias) as loaded. Engine classes loadfsm cannot edit
register an ``Fp8Layout`` instead (``register_fp8_layout``), which also puts the results
in the engine's kernel layout before they are installed or, on reload, copied in place.
Unlike ``fp8``, the handler never swaps the module, so its forward keeps running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .base import register_handler
from .fp8 import Fp8Handler


@dataclass(frozen=True)
class Fp8Layout:
    """How an engine class takes FP8 results.

    Args:
        weights: ``fn(module) -> attribute names`` quantized to FP8.
        arrange: ``fn(module, results, config) -> results`` in the engine's kernel layout
            (what is installed, and what a reload copies into the live tensors).
        install: ``fn(module, results, config)``: put them into the module.
        skip: ``fn(name, module) -> bool``: modules of the class left in full precision
            (routers, gates) besides those the config excludes.
    """

    weights: Callable[[nn.Module], tuple[str, ...]]
    arrange: Callable[[nn.Module, dict, object], dict]
    install: Callable[[nn.Module, dict, object], None]
    skip: Callable[[str, nn.Module], bool] = lambda name, module: False


_LAYOUTS: dict[type, Fp8Layout] = {}


def register_fp8_layout(cls: type[nn.Module], layout: Fp8Layout) -> None:
    """``cls`` modules (and subclasses) are quantized online and installed by ``layout``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")
    _LAYOUTS[cls] = layout


def fp8_layout(module: nn.Module) -> Fp8Layout | None:
    return next((_LAYOUTS[k] for k in type(module).__mro__ if k in _LAYOUTS), None)


@register_handler("engine_fp8")
class EngineFp8Handler(Fp8Handler):
    """Claims modules with ``install_fp8`` or a registered ``Fp8Layout`` that the config
    does not exclude."""

    def claims(self, layer_name, module) -> bool:
        if self.session.quant.excludes(layer_name):
            return False
        layout = fp8_layout(module)
        if layout is not None:
            return not layout.skip(layer_name, module)
        return callable(getattr(module, "install_fp8", None))

    def weight_attrs(self, rec) -> tuple[str, ...]:
        layout = fp8_layout(rec.module)
        return tuple(rec.module.fp8_weights if layout is None else layout.weights(rec.module))

    def quantize(self, rec):
        results = super().quantize(rec)
        layout = fp8_layout(rec.module)
        return results if layout is None else layout.arrange(rec.module, results,
                                                             self.session.quant)

    def install(self, rec) -> None:
        layout = fp8_layout(rec.module)
        if layout is None:
            rec.module.install_fp8(dict(rec.results), self.session.quant)
        else:
            layout.install(rec.module, dict(rec.results), self.session.quant)
