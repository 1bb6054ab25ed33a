"""FP8 for transformers' fused MoE experts (``MixtralExperts``, ``Qwen2MoeExperts``...).

transformers 5 keeps experts as two stacked parameters, ``gate_up_proj`` [E, 2I, H]
(gate rows, then up) and ``down_proj`` [E, H, I], called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
That is loadfsm's ``StackedExperts`` layout, so the FP8 form is ``Fp8StackedExperts``
with transformers' call contract and the module's own activation. Each expert's matmul
runs on its FP8 weight (``fp8_matmul``); no bf16 copy of the experts is ever kept.
Expert modules in any other shape (biases, transposed weights, custom gating) are not
claimed and load in full precision.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..handlers.base import Install
from ..handlers.fp8 import Fp8ExpertsHandler
from ..handlers.registry import register_handler
from ..quant.config import Fp8Config
from ..quant.linear import Fp8StackedExperts

_CALL = ["hidden_states", "top_k_index", "top_k_weights"]


class Fp8Experts(Fp8StackedExperts):
    """``Fp8StackedExperts`` called the way transformers calls its experts module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:     # masked slots (expert parallel)
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self.expert_linear(hidden_states[token_idx], "gate_up_proj",
                                          expert).chunk(2, dim=-1)
            h = self.expert_linear(self.act_fn(gate) * up, "down_proj", expert)
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module in the plain fused SwiGLU layout."""
    params = {name: p for name, p in module._parameters.items() if p is not None}
    if (set(params) != {"gate_up_proj", "down_proj"}
            or not callable(getattr(module, "act_fn", None))):
        return False
    gate_up, down = params["gate_up_proj"].shape, params["down_proj"].shape
    if (len(gate_up) != 3 or gate_up[1] % 2
            or tuple(down) != (gate_up[0], gate_up[2], gate_up[1] // 2)):
        return False
    layout = (getattr(module, "has_gate", True), getattr(module, "is_concatenated", True),
              not getattr(module, "has_bias", False), not getattr(module, "is_transposed", False),
              not getattr(module, "has_post_expert_norm", False))
    gating = getattr(type(module), "_apply_gate", None)
    default_gate = gating is None or gating.__module__ == "transformers.integrations.moe"
    call = list(inspect.signature(module.forward).parameters)
    return all(layout) and default_gate and call == _CALL


class HfExpertsFp8Handler(Fp8ExpertsHandler):
    """transformers' fused experts -> ``Fp8Experts`` (keeping the module's activation)."""

    name = "hf_experts_fp8"
    installs = (Fp8Experts,)
    kernel = Fp8Experts

    def install(self, rec, config) -> Install:
        install = super().install(rec, config)
        install.module.act_fn = rec.module.act_fn
        return install


register_handler(HfExpertsFp8Handler(), config=Fp8Config,
                 when=lambda name, module: is_fused_experts(module))
