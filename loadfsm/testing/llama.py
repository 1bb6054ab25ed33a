"""A Llama-style decoder with the fused layouts inference engines use.

Parameter names follow the Hugging Face layout (``model.embed_tokens``,
``model.layers.N...``, ``model.norm``, ``lm_head``) so unfused tensors map to the
checkpoint one to one. Where engines fuse (``qkv_proj``, ``gate_up_proj``) or pad
(vocab rows), ``checkpoint_pieces`` says which checkpoint tensors fill which rows.

Modules call their linears as children (``self.qkv_proj(x)``) so a loader may swap
an ``nn.Linear`` for an FP8 linear module. Build under ``torch.device("meta")`` and
let a loader fill it, or build on a real device for a randomly initialized model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..pieces import Piece, fused_rows, rows
from ..quant.kv_cache import CHECKPOINT_KV_SCALES
from .attention import Attention, RotaryEmbedding
from .config import ModelConfig
from .layers import RMSNorm


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, rotary, attention computation, output projection."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False, dtype=dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.attn = Attention(config.num_heads, config.num_kv_heads, config.head_dim,
                              fp8_kv_cache=config.fp8_kv_cache)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim)      # [B, S, Hq, D]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)   # [B, S, Hkv, D]
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, positions)
        return self.o_proj(self.attn(q, k, v, positions))    # [B, S, H]

    def layer_pieces(self, prefix: str) -> list[Piece]:
        """Pieces under ``prefix`` (``"model.layers.N.self_attn."``): fused q/k/v, kv scales."""
        pieces = fused_rows(prefix, f"{prefix}qkv_proj.weight", [
            ("q_proj.weight", "q", self.q_size),
            ("k_proj.weight", "k", self.kv_size),
            ("v_proj.weight", "v", self.kv_size),
        ])
        # FP8-KV checkpoints name the scales after self_attn; bf16 ones lack them.
        pieces += [Piece(f"{prefix}{name}", f"{prefix}attn.{name}", optional=True)
                   for name in CHECKPOINT_KV_SCALES]
        return pieces


class LlamaMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused (gate rows first)."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False, dtype=dtype)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size,
                                   bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)     # [B, S, I] each
        return self.down_proj(F.silu(gate) * up)

    def layer_pieces(self, prefix: str) -> list[Piece]:
        """Pieces under ``prefix`` (``"model.layers.N.mlp."``): fused gate/up."""
        return fused_rows(prefix, f"{prefix}gate_up_proj.weight", [
            ("gate_proj.weight", "gate", self.intermediate),
            ("up_proj.weight", "up", self.intermediate),
        ])


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, mlp: nn.Module, *,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))

    def layer_pieces(self, prefix: str) -> list[Piece]:
        return (self.self_attn.layer_pieces(f"{prefix}self_attn.")
                + self.mlp.layer_pieces(f"{prefix}mlp."))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm (the HF ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, make_mlp, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.padded_vocab, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, make_mlp(config, dtype=dtype), dtype=dtype)
            for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, S]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)   # [S]
        x = self.embed_tokens(input_ids)                                          # [B, S, H]
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Dense Llama decoder with an lm_head: ``model(input_ids [B, S]) -> logits [B, S, V]``.

    ``V`` is ``config.vocab_size``: rows the model holds for padding are sliced off.
    With ``tie_embeddings``, ``lm_head.weight`` is the same Parameter as
    ``model.embed_tokens.weight`` (call ``tie_weights`` again after ``to_empty``,
    which does not preserve sharing).
    """

    mlp_class: type[nn.Module] = LlamaMLP

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, type(self).mlp_class, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab, bias=False, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding Parameter when the config ties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, S] -> logits: [B, S, vocab_size]
        logits = self.lm_head(self.model(input_ids))          # [B, S, padded_vocab]
        return logits[..., : self.config.vocab_size]

    def checkpoint_pieces(self) -> list[Piece]:
        """Pieces of the parameters whose checkpoint layout differs from their own.

        Fused q/k/v and gate/up (or stacked experts), padded embedding and lm_head
        rows, and optional kv-cache scales. Every other parameter is fed by the
        checkpoint tensor of its own name.
        """
        pieces = []
        cfg = self.config
        if cfg.padded_vocab != cfg.vocab_size:
            heads = ["model.embed_tokens.weight"]
            if not cfg.tie_embeddings:   # tied: lm_head.weight is the embedding itself
                heads.append("lm_head.weight")
            pieces += [Piece(name, name, (rows(0, cfg.vocab_size),)) for name in heads]
        for i, layer in enumerate(self.model.layers):
            pieces += layer.layer_pieces(f"model.layers.{i}.")
        return pieces
