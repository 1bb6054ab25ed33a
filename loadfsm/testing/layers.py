"""Building blocks the reference models share: RMSNorm and top-k MoE routing."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]; normalize in float32 like the reference implementations.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def route_top_k(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router, top-k experts per token, weights renormalized over the chosen ones.

    router_logits: [T, E] -> (topk_weights [T, k] float32, topk_ids [T, k]).
    """
    probs = router_logits.float().softmax(dim=-1)
    topk_weights, topk_ids = probs.topk(top_k, dim=-1)
    return topk_weights / topk_weights.sum(dim=-1, keepdim=True), topk_ids


def moe_forward(gate: nn.Module, experts: nn.Module, top_k: int,
                x: torch.Tensor) -> torch.Tensor:
    """Route each token to its top-k experts and sum their weighted outputs.

    x: [..., H] -> [..., H]; ``experts(x [T, H], topk_ids, topk_weights)``.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])                                         # [T, H]
    topk_weights, topk_ids = route_top_k(gate(x), top_k)                 # [T, k]
    return experts(x, topk_ids, topk_weights).view(shape)
