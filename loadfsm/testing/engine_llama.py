"""A Llama (dense or MoE) written the way inference engines write models (vLLM's style).

The model maps checkpoint names itself in ``load_weights(weights)`` with a
``stacked_params_mapping`` and calls each parameter's ``weight_loader`` with a shard
id: nothing in it knows loadfsm. Loaded through loadfsm's engine hook::

    with torch.device("meta"):
        model = EngineLlamaForCausalLM(config)
    with loadfsm.LoadSession(model, quant="fp8", device="cuda") as session:
        model.load_weights(safetensors_weights("ckpt_dir/"))

it holds the same tensors and gives the same logits as ``LlamaForCausalLM`` /
``MoEForCausalLM`` loaded by ``loadfsm.load`` from the same checkpoint. Under
``torch.distributed`` it is tensor-parallel over the default group.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.engine_shards import default_weight_loader
from .attention import Attention, RotaryEmbedding
from .config import ModelConfig, as_config
from .engine_layers import (FusedMoE, MergedColumnParallelLinear,
                            ParallelLMHead, QKVParallelLinear, ReplicatedLinear,
                            RowParallelLinear, VocabParallelEmbedding)
from .layers import RMSNorm, moe_forward


class EngineAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype=None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim,
                                          config.num_heads, config.num_kv_heads, dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size,
                                        dtype=dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.attn = Attention(self.num_heads, self.num_kv_heads, config.head_dim,
                              fp8_kv_cache=config.fp8_kv_cache)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]; this rank's heads only
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(q, k, positions)
        return self.o_proj(self.attn(q, k, v, positions))


class EngineMLP(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype=None):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size],
                                                       dtype=dtype)
        self.down_proj = RowParallelLinear(size, config.hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class EngineMoE(nn.Module):
    """Replicated router, fused experts (routing as ``SparseMoeBlock``)."""

    def __init__(self, config: ModelConfig, *, dtype=None):
        super().__init__()
        self.top_k = config.experts_per_token
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, dtype=dtype)
        self.experts = FusedMoE(config.num_experts, config.hidden_size,
                                config.moe_intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, H]
        return moe_forward(self.gate, self.experts, self.top_k, x)


class EngineDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)
        self.self_attn = EngineAttention(config, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)
        self.mlp = (EngineMoE if config.is_moe else EngineMLP)(config, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class EngineLlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   pad_to=config.pad_vocab_to, dtype=dtype)
        self.layers = nn.ModuleList(EngineDecoderLayer(config, dtype=dtype)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions)
        return self.norm(x)


class EngineLlamaForCausalLM(nn.Module):
    """``model(input_ids [B, S]) -> logits [B, S, vocab_size]``, tensor-parallel when a
    process group exists. Vocab rows are padded to ``config.pad_vocab_to``."""

    # (parameter name part, checkpoint name part, shard id)
    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, config: ModelConfig | str, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config = as_config(config)
        self.model = EngineLlamaModel(config, dtype=dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      pad_to=config.pad_vocab_to, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))

    def expert_params_mapping(self) -> list[tuple[str, str, int, str]]:
        """(parameter name part, checkpoint name part, expert id, shard id), as vLLM's."""
        pairs = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))
        return [("experts.w13_" if shard in ("w1", "w3") else "experts.w2_",
                 f"experts.{e}.{ckpt}.", e, shard)
                for e in range(self.config.num_experts) for shard, ckpt in pairs]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Map checkpoint names to parameters and call their ``weight_loader``s.

        Returns the parameter names loaded.
        """
        params = dict(self.named_parameters())
        experts = self.expert_params_mapping()
        loaded = set()
        for name, loaded_weight in weights:
            if self.config.tie_embeddings and name == "lm_head.weight":
                continue
            for param_name, weight_name, shard_id in self.stacked_params_mapping:
                if weight_name not in name or "mlp.experts" in name:
                    continue
                name = name.replace(weight_name, param_name)
                param = params[name]
                param.weight_loader(param, loaded_weight, shard_id)
                break
            else:
                for param_name, weight_name, expert_id, shard_id in experts:
                    if weight_name not in name:
                        continue
                    name = name.replace(weight_name, param_name)
                    param = params[name]
                    param.weight_loader(param, loaded_weight, name, shard_id=shard_id,
                                        expert_id=expert_id)
                    break
                else:
                    param = params[name]
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    loader(param, loaded_weight)
            loaded.add(name)
        return loaded
