"""Online FP8 for engine layers that keep their own kernel tensors (vLLM's convention).

An engine's linear or fused-MoE module runs FP8 itself (vLLM: ``quant_method.apply``),
with its tensor-parallel collectives in its own ``forward``. Such a module names its FP8
weights in ``fp8_weights`` (attribute names) and takes the results in
``install_fp8(tensors, config)``: ``{attr: q, f"{attr}_scale": scale}`` for each FP8
weight, every other attribute (bias) as loaded. Unlike ``fp8``, the handler never swaps
the module, so its forward keeps running.
"""

from __future__ import annotations

from .base import register_handler
from .fp8 import Fp8Handler


@register_handler("engine_fp8")
class EngineFp8Handler(Fp8Handler):
    """Claims modules with ``install_fp8`` that the config does not exclude."""

    def claims(self, layer_name, module) -> bool:
        return (callable(getattr(module, "install_fp8", None))
                and not self.session.quant.excludes(layer_name))

    def weight_attrs(self, rec) -> tuple[str, ...]:
        return tuple(rec.module.fp8_weights)

    def install(self, rec) -> None:
        rec.module.install_fp8(dict(rec.results), self.session.quant)
