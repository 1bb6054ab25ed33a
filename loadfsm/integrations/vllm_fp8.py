"""Online FP8 for vLLM's own layers (vLLM 0.33), in the layout vLLM's own FP8 path leaves.

The layout is what ``quantization="fp8"`` (online, from bf16) produces after
``process_weights_after_loading`` (``layers/quantization/online/fp8.py``), so the layers
hold what vLLM's FP8 kernels read:

- linears (``LinearBase``), per tensor (``Fp8PerTensorOnlineLinearMethod``): ``weight``
  float8_e4m3fn ``[K, N]``, the transposed view of a contiguous ``[N, K]``
  (``qweight.t()``: the column-major B operand ``torch._scaled_mm`` and CUTLASS take),
  ``weight_scale`` float32 ``[1]`` = amax / 448, ``input_scale = None`` (activations
  are scaled dynamically). Per channel (``Fp8PtpcOnlineLinearMethod``): the same weight,
  ``weight_scale`` float32 ``[N, 1]``.
- routed experts (``RoutedExperts``, ``Fp8PerTensorOnlineMoEMethod``): ``w13_weight``
  ``[E, 2I, H]`` and ``w2_weight`` ``[E, H, I]`` float8_e4m3fn, not transposed, one
  float32 scale per expert (``w13_weight_scale``, ``w2_weight_scale``: ``[E]``), input
  scales ``None``.

Routers stay bf16 by default: vLLM's ``GateLinear`` and any linear named ``gate`` or
``*_gate`` (Mixtral's ``block_sparse_moe.gate``, Qwen2-MoE's ``shared_expert_gate``).
Block scales (``weight_scale_inv``) are not produced: ``fp8-block`` is refused.

A quantized linear computes through ``DequantFp8Apply`` (``x @ (q * scale)``, reading
the layout above), since vLLM's own FP8 GEMMs are CUDA kernels. vLLM's
``process_weights_after_loading`` skips it (not a ``QuantizeMethodBase``), so it never
re-processes loadfsm's tensors. Routed experts keep vLLM's ``quant_method``: running them
needs vLLM's FP8 MoE kernel set up over these tensors (``_Fp8OnlineMoEBase._setup_kernel``,
CUDA), which this module does not do.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.linear import LinearBase

from ..errors import LoadError
from ..handlers.engine_fp8 import Fp8Layout, register_fp8_layout
from ..quant.linear import fp8_matmul


class UnsupportedFp8LayoutError(LoadError):
    """The FP8 scheme asked for has no layout in vLLM's online FP8 path."""


def _check(config) -> None:
    if config.granularity == "block":
        raise UnsupportedFp8LayoutError(
            "fp8-block has no vLLM online layout here (vLLM's block path keeps "
            "weight_scale_inv per 128x128 tile); use fp8 or fp8-channel")


class DequantFp8Apply:
    """``quant_method`` of a linear holding vLLM's per-tensor or per-channel FP8 layout."""

    def __init__(self, config):
        self.config = config

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        q, scale = layer.weight.t(), layer.weight_scale            # [N, K], [1] or [N, 1]
        if self.config.granularity == "tensor":
            scale = scale.reshape(())
        return fp8_matmul(x, q, scale, bias, self.config, x.dtype)


def _linear_arrange(module, results: dict, config) -> dict:
    _check(config)
    q, scale = results["weight"], results["weight_scale"]
    return {**results, "weight": q.t(),
            "weight_scale": scale.reshape(1) if config.granularity == "tensor" else scale}


def _linear_attrs(module, config) -> dict:
    return {"input_scale": None, "quant_method": DequantFp8Apply(config)}


def _is_router(name: str, module: nn.Module) -> bool:
    last = name.rpartition(".")[2]
    return isinstance(module, GateLinear) or last == "gate" or last.endswith("_gate")


register_fp8_layout(LinearBase, Fp8Layout(
    weights=lambda m: ("weight",), arrange=_linear_arrange, attrs=_linear_attrs,
    skip=_is_router))


def _experts_arrange(module, results: dict, config) -> dict:
    _check(config)
    if config.granularity == "tensor":
        for attr in ("w13_weight_scale", "w2_weight_scale"):
            results[attr] = results[attr].reshape(-1)              # [E]
    return results


def _experts_attrs(module, config) -> dict:
    return {"w13_input_scale": None, "w2_input_scale": None}


register_fp8_layout(RoutedExperts, Fp8Layout(
    weights=lambda m: ("w13_weight", "w2_weight"), arrange=_experts_arrange,
    attrs=_experts_attrs))
