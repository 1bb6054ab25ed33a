"""``StackedExperts``: the MoE layout loadfsm quantizes (the FP8 handler claims this type
and installs ``Fp8StackedExperts`` in its place)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StackedExperts(nn.Module):
    """SwiGLU weights of ``E`` experts stacked in two parameters.

    ``gate_up_proj``: [E, 2 * intermediate, hidden] (gate rows first, then up);
    ``down_proj``: [E, hidden, intermediate]. Engines keep experts stacked so one
    kernel can serve them all; checkpoints store them one tensor per expert.
    Subclasses change how one expert's matmul runs by overriding ``expert_linear``.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *,
                 device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate, hidden, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden, intermediate, device=device, dtype=dtype))

    def expert_linear(self, x: torch.Tensor, which: str, expert: int) -> torch.Tensor:
        """``x @ W[expert].T`` for ``which`` in {"gate_up_proj", "down_proj"}."""
        return F.linear(x, getattr(self, which)[expert])

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_ids, topk_weights: [T, k]
        out = torch.zeros_like(x)
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(topk_ids == expert)
            if token_idx.numel() == 0:
                continue
            gate, up = self.expert_linear(x[token_idx], "gate_up_proj", expert).chunk(2, dim=-1)
            h = self.expert_linear(F.silu(gate) * up, "down_proj", expert)
            out.index_add_(0, token_idx, (h * topk_weights[token_idx, slot, None]).to(x.dtype))
        return out
