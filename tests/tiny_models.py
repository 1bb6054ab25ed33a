"""Tiny models named for the case they test, checkpoint helpers for them, the small Llama
config the push, reliability and trace tests share, and arrival orders."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import save_file
from torch import nn

import loadfsm
from loadfsm.testing import CONFIGS, build_model
from loadfsm.pieces import Piece, fused_rows

SMALL = replace(CONFIGS["tiny"], vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)


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
