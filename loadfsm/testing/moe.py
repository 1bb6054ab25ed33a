"""A mixture-of-experts decoder: the Llama decoder with a routed, stacked-expert MLP.

Checkpoints (Mixtral / Qwen-MoE style) store one tensor per expert
(``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``) and the router as
``model.layers.N.mlp.gate.weight``; the model stacks the experts as engines do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..pieces import Piece, fused_rows
from ..quant.experts import StackedExperts
from .config import ModelConfig
from .layers import moe_forward
from .llama import LlamaForCausalLM


class SparseMoeBlock(nn.Module):
    """Top-k softmax router (renormalized over the chosen experts) and stacked experts."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.experts_per_token
        self.intermediate = config.moe_intermediate_size
        # A plain nn.Linear: routers are small and usually left unquantized.
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=dtype)
        self.experts = StackedExperts(config.num_experts, config.hidden_size,
                                      config.moe_intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]
        return moe_forward(self.gate, self.experts, self.top_k, x)

    def layer_pieces(self, prefix: str) -> list[Piece]:
        """Pieces under ``prefix`` (``"model.layers.N.mlp."``): one per expert tensor."""
        gate_up, down = f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"
        pieces = []
        for e in range(self.num_experts):
            expert = f"{prefix}experts.{e}."
            pieces += fused_rows(expert, gate_up, [
                ("gate_proj.weight", "gate", self.intermediate),
                ("up_proj.weight", "up", self.intermediate),
            ], expert=e)
            pieces.append(Piece(f"{expert}down_proj.weight", down, (e,), shard="down", expert=e))
        return pieces


class MoEForCausalLM(LlamaForCausalLM):
    """Llama decoder whose MLPs are ``SparseMoeBlock``s; same forward and pieces contract."""

    mlp_class = SparseMoeBlock
