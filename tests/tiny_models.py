"""Tiny models named for the case they test, checkpoint helpers for them, the small Llama
configs the push, engine, reliability and trace tests share, loads through an engine's own
``load_weights``, and arrival orders."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import save_file
from torch import nn

import loadfsm
from loadfsm.testing import CONFIGS, build_model
from loadfsm.testing.engine_llama import EngineLlamaForCausalLM
from loadfsm.pieces import fused_rows

SMALL = replace(CONFIGS["tiny"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)


def _four_experts(config):
    return replace(config, num_experts=4, experts_per_token=2, moe_intermediate_size=64)


SMALL_MOE = _four_experts(SMALL)
# Vocab 500 padded to 512 rows (2 x 256 for two ranks): the engine-hook and TP tests' Llama.
PADDED_SMALL = replace(SMALL, vocab_size=500, pad_vocab_to=64)
PADDED_SMALL_MOE = _four_experts(PADDED_SMALL)
QKV0 = "model.layers.0.self_attn.qkv_proj"     # layer 0's fused qkv, in every model above


class NormAndLinears(nn.Module):
    """A norm, a bias-free linear and a linear with bias: the plain cases."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128, bias=False)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


class FusedQKVModel(nn.Module):
    """One fused qkv linear fed by separate q, k and v checkpoint tensors."""

    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(64, 64 + 32 + 32, bias=False)

    def checkpoint_pieces(self):
        return fused_rows("", "qkv_proj.weight",
                          [("q_proj.weight", "q", 64), ("k_proj.weight", "k", 32),
                           ("v_proj.weight", "v", 32)])

    def forward(self, x):
        return self.qkv_proj(x)


def random_state(model_cls, seed=0, dtype=torch.bfloat16):
    """Checkpoint tensors (in checkpoint naming) for one of the models above."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = model_cls()
    pieces = {p.ckpt_name: p for p in getattr(model, "checkpoint_pieces", lambda: [])()}
    params = dict(model.named_parameters())
    state = {}
    covered = {p.param for p in pieces.values()}
    for name, piece in pieces.items():
        shape = torch.empty(params[piece.param].shape, device="meta")[piece.region].shape
        state[name] = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    for name, param in params.items():
        if name not in covered:
            state[name] = (torch.randn(param.shape, generator=gen) * 0.05).to(dtype)
    return state


def write(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def meta_model(model_cls, dtype=torch.bfloat16):
    with torch.device("meta"):
        return model_cls().to(dtype)


def round_robin(config, state):
    """The checkpoint's tensors reordered: first piece of every layer, then every second..."""
    plan = loadfsm.LoadSession(build_model(config), device="cpu").plan
    by_layer: dict[str, list] = {}
    for name, tensor in state.items():
        by_layer.setdefault(plan.by_ckpt[name].name, []).append((name, tensor))
    queues = list(by_layer.values())
    return [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]


def engine_model(config=PADDED_SMALL):
    """The vLLM-style Llama (a ``weight_loader`` per parameter, fused qkv and gate_up)."""
    with torch.device("meta"):
        return EngineLlamaForCausalLM(config, dtype=torch.bfloat16)


def hook_load(config, weights, quant=None, **kwargs):
    """An engine model loaded by its own ``load_weights(weights)`` inside a LoadSession."""
    model = engine_model(config)
    with loadfsm.LoadSession(model, quant=quant, device="cpu", **kwargs) as session:
        model.load_weights(weights)
    return model, session


def randn(*shape: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A seeded standard-normal bf16 tensor."""
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device).to(torch.bfloat16)
