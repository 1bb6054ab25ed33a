"""Rotary position embedding and the attention computation (with kv-cache scales)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fp8 import FP8_DTYPE, FP8_MAX
from ..quant.kv_cache import CHECKPOINT_KV_SCALES, DEFAULT_KV_SCALE


class RotaryEmbedding(nn.Module):
    """Rotary tables ``cos_cached`` / ``sin_cached``: [max_seq_len, head_dim], float32.

    The tables are derived, not loaded: they are non-persistent buffers, so no
    checkpoint tensor feeds them. A model built on ``meta`` holds them as shapes
    only; ``compute_buffers(device)`` fills them (the loader calls it on every
    module that defines it).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        for name in ("cos_cached", "sin_cached"):
            table = torch.empty(max_seq_len, head_dim, dtype=torch.float32)
            self.register_buffer(name, table, persistent=False)
        if not self.cos_cached.is_meta:
            self.compute_buffers(self.cos_cached.device)

    def compute_buffers(self, device: torch.device | str) -> None:
        """(Re)compute ``cos_cached`` and ``sin_cached`` on ``device``."""
        half = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))                   # [D/2]
        t = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                                          # [L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                                   # [L, D]
        self.cos_cached, self.sin_cached = emb.cos(), emb.sin()

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [B, S, Hq, D], k: [B, S, Hkv, D], positions: [S] or [B, S]
        cos = self.cos_cached[positions].unsqueeze(-2)  # [(B,) S, 1, D]
        sin = self.sin_cached[positions].unsqueeze(-2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face "rotate_half" convention: pairs are (i, i + D/2), as HF q/k weights expect.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def _fp8_roundtrip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # What an FP8 cache stores (x / scale in e4m3) and what attention reads back.
    stored = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (stored.float() * scale).to(x.dtype)


class Attention(nn.Module):
    """GQA causal attention over already-projected, rotary-applied q, k, v.

    Why a module of its own: engines keep the attention computation (and its kv
    cache) apart from the projections, and FP8-KV checkpoints give it calibration
    scales. It is a layer that no checkpoint weight feeds except those optional
    scales, so a loader must bring it to FINALIZED with defaults when they are absent.

    ``k_scale``, ``v_scale``, ``q_scale``: float32 scalar parameters, default 1.0
    (``DEFAULT_KV_SCALE``). With ``fp8_kv_cache`` the forward round-trips q, k, v
    through float8_e4m3fn with those scales, as an FP8 kv cache would; without it
    the scales do not affect the output.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 fp8_kv_cache: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.fp8_kv_cache = fp8_kv_cache
        for name in CHECKPOINT_KV_SCALES:
            scale = torch.full((), DEFAULT_KV_SCALE, dtype=torch.float32)
            setattr(self, name, nn.Parameter(scale, requires_grad=False))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        # q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; positions: [S] or [B, S]
        if self.fp8_kv_cache:
            q = _fp8_roundtrip(q, self.q_scale)
            k = _fp8_roundtrip(k, self.k_scale)
            v = _fp8_roundtrip(v, self.v_scale)
        # Key j is visible to query i when it is not later in the sequence.
        mask = positions.unsqueeze(-2) <= positions.unsqueeze(-1)   # [(B,) S, S]
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)                                # [B, 1, S, S]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, enable_gqa=True)                        # [B, Hq, S, D]
        return out.transpose(1, 2).flatten(2)                       # [B, S, Hq * D]
