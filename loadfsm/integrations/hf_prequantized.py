"""Pre-quantized FP8 checkpoints into transformers' fused MoE experts.

A DeepSeek-V3 or Qwen3-MoE FP8 checkpoint holds one FP8 tensor and one scale per
expert projection; transformers 5 keeps the experts fused (``hf_experts``). The
pre-quantized experts handler plans each expert's weight and scale as pieces of the
fused parameters, and installs ``PrequantizedFp8Experts``: transformers' call contract,
the module's own activation, and the checkpoint's layout for later pushes.
"""

from __future__ import annotations

from ..handlers.base import Install
from ..handlers.fp8_checkpoint import PrequantizedExpertsHandler
from ..handlers.registry import register_handler
from ..quant.fp8_layout import Fp8CheckpointConfig
from .hf_experts import Fp8Experts, is_fused_experts


class PrequantizedFp8Experts(Fp8Experts):
    """``Fp8Experts`` loaded from a pre-quantized checkpoint; ``layout`` says what a push
    feeds it."""

    layout: Fp8CheckpointConfig


class HfPrequantizedExpertsHandler(PrequantizedExpertsHandler):
    """transformers' fused experts fed FP8 expert tensors -> ``PrequantizedFp8Experts``."""

    name = "hf_experts_fp8_prequantized"
    installs = (PrequantizedFp8Experts,)

    def kernel(self, results, config, out_dtype):
        return PrequantizedFp8Experts.from_quantized(
            results["gate_up_proj"], results["gate_up_proj_scale"], results["down_proj"],
            results["down_proj_scale"], config, out_dtype=out_dtype)

    def install(self, rec, config) -> Install:
        install = super().install(rec, config)
        if install.module is None:
            return install
        return Install(module=install.module, attrs={**install.attrs,
                                                     "act_fn": rec.module.act_fn})


register_handler(HfPrequantizedExpertsHandler(), config=Fp8CheckpointConfig,
                 when=lambda name, module: is_fused_experts(module))
