"""Deterministic bf16 checkpoints in Hugging Face naming, and the bf16 reference model.

The checkpoint layout is written down here independently of the models (unfused
q/k/v and gate/up, one tensor per expert, ``vocab_size`` embedding rows, no
``lm_head.weight`` when tied, kv-cache scales only when the config says so), so
tests can check a model's ``checkpoint_pieces`` against it.

Every tensor is drawn from its own generator, seeded by ``(seed, name)``: a tensor's
values do not depend on which other tensors are generated or in what order, so
multi-GB checkpoints are written one tensor at a time.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..ledger import nbytes
from ..pieces import Piece
from ..plan import TensorEntry
from ..quant.kv_cache import CHECKPOINT_KV_SCALES, DEFAULT_KV_SCALE
from ..sources.checkpoint_files import INDEX_NAME
from ..sources.dtypes import NAMES
from .attention import RotaryEmbedding
from .config import ModelConfig, as_config
from .registry import build_model

ORDERS = ("model", "reversed", "shuffled", "interleaved")


def _bf16(name: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(name, shape, torch.bfloat16)


def checkpoint_layout(config: ModelConfig | str) -> list[TensorEntry]:
    """Every tensor of the config's bf16 checkpoint, in model order.

    Kv-cache scales (present only with ``kv_cache_scales``) are float32 scalars,
    as FP8-KV checkpoints store them; everything else is bf16.
    """
    cfg = as_config(config)
    H, D = cfg.hidden_size, cfg.head_dim
    specs = [_bf16("model.embed_tokens.weight", (cfg.vocab_size, H))]
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}."
        attn, mlp = f"{layer}self_attn.", f"{layer}mlp."
        specs += [
            _bf16(f"{layer}input_layernorm.weight", (H,)),
            _bf16(f"{attn}q_proj.weight", (cfg.num_heads * D, H)),
            _bf16(f"{attn}k_proj.weight", (cfg.num_kv_heads * D, H)),
            _bf16(f"{attn}v_proj.weight", (cfg.num_kv_heads * D, H)),
            _bf16(f"{attn}o_proj.weight", (H, cfg.num_heads * D)),
        ]
        if cfg.kv_cache_scales:
            specs += [TensorEntry(f"{attn}{name}", (), torch.float32)
                      for name in CHECKPOINT_KV_SCALES]
        specs.append(_bf16(f"{layer}post_attention_layernorm.weight", (H,)))
        if cfg.is_moe:
            I = cfg.moe_intermediate_size
            specs.append(_bf16(f"{mlp}gate.weight", (cfg.num_experts, H)))
            for e in range(cfg.num_experts):
                specs += [_bf16(f"{mlp}experts.{e}.gate_proj.weight", (I, H)),
                          _bf16(f"{mlp}experts.{e}.up_proj.weight", (I, H)),
                          _bf16(f"{mlp}experts.{e}.down_proj.weight", (H, I))]
        else:
            I = cfg.intermediate_size
            specs += [_bf16(f"{mlp}gate_proj.weight", (I, H)),
                      _bf16(f"{mlp}up_proj.weight", (I, H)),
                      _bf16(f"{mlp}down_proj.weight", (H, I))]
    specs.append(_bf16("model.norm.weight", (H,)))
    if not cfg.tie_embeddings:
        specs.append(_bf16("lm_head.weight", (cfg.vocab_size, H)))
    return specs


def _generate(spec: TensorEntry, seed: int, num_layers: int = 1) -> torch.Tensor:
    """Values shaped like a trained model's, so quantization error is judged fairly.

    Matrices get per-row magnitudes spread over about 0.5x-2x (trained rows differ,
    which is what per-channel scales are for); projections that write into the
    residual stream (``o_proj``, ``down_proj``) get the usual ``1/sqrt(2 * layers)``
    scaled init, so each layer adds a small update to the stream as in real models.
    """
    # One generator per tensor, seeded by (seed, name): values independent of order.
    # Hashed to 32 bits because the CPU generator (mt19937) keeps only 32 seed bits.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{spec.name}".encode()))
    out = torch.empty(spec.shape, dtype=spec.dtype)
    if spec.name.endswith("_scale"):
        return out.uniform_(0.5, 1.5, generator=gen)
    if spec.name.endswith("norm.weight"):
        return out.normal_(1.0, 0.02, generator=gen)
    std = 0.02
    if spec.name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * num_layers)
    out.normal_(0.0, std, generator=gen)
    if out.dim() == 2:
        row_scale = torch.empty(out.shape[0], 1).uniform_(-0.7, 0.7, generator=gen).exp_()
        out.mul_(row_scale.to(out.dtype))
    return out


def reference_state_dict(config: ModelConfig | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """All tensors of the config's checkpoint (CPU, checkpoint naming, model order).

    Weights are ``normal * 0.02``, norm weights ``1 + normal * 0.02``, kv scales
    uniform in [0.5, 1.5]. The same ``seed`` gives identical tensors.
    """
    return {spec.name: _generate(spec, seed, as_config(config).num_layers)
            for spec in checkpoint_layout(config)}


def write_checkpoint(config: ModelConfig | str, directory: str | Path, *, seed: int = 0,
                     max_shard_bytes: int = 2**30, order: str = "model",
                     index: bool = True) -> Path:
    """Write the ``reference_state_dict`` as sharded safetensors files.

    Files are ``model-0000K-of-0000N.safetensors`` plus, with ``index``, the HF
    ``model.safetensors.index.json``. Tensors are generated and written one at a
    time, so multi-GB checkpoints never sit in memory whole.

    Args:
        order: which tensors share a file, and their order inside it:
            ``"model"``: model order, packed into shards of at most ``max_shard_bytes``
            (a tensor larger than that gets a shard of its own);
            ``"reversed"``: the same from the last tensor (last layer first);
            ``"shuffled"``: a permutation seeded by ``seed``, then packed;
            ``"interleaved"``: tensor ``i`` goes to shard ``i % N`` (at least two
            shards), so the pieces of each layer land in different files.
        index: write the index file; ``False`` leaves only the shards.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        ValueError: an unknown ``order`` or a non-positive ``max_shard_bytes``.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    specs = checkpoint_layout(config)
    shards = _plan_shards(specs, order, max_shard_bytes, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
             for k in range(1, len(shards) + 1)]
    num_layers = as_config(config).num_layers
    # One thread per shard: generating and writing release the GIL, so a multi-GB
    # benchmark checkpoint is written at the speed of the machine, not of one core.
    with ThreadPoolExecutor(max_workers=min(len(shards), os.cpu_count() or 1)) as pool:
        list(pool.map(lambda pair: _write_safetensors(directory / pair[0], pair[1], seed,
                                                      num_layers), zip(names, shards)))
    weight_map = {spec.name: file_name for file_name, shard in zip(names, shards)
                  for spec in shard}
    if index:
        total = sum(spec.nbytes for spec in specs)
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n")
    return directory


def _plan_shards(specs: list[TensorEntry], order: str, max_shard_bytes: int,
                 seed: int) -> list[list[TensorEntry]]:
    if order == "interleaved":
        total = sum(spec.nbytes for spec in specs)
        n = min(len(specs), max(2, -(-total // max_shard_bytes)))
        return [specs[k::n] for k in range(n)]
    if order == "reversed":
        specs = specs[::-1]
    elif order == "shuffled":
        perm = torch.randperm(len(specs), generator=torch.Generator().manual_seed(seed))
        specs = [specs[i] for i in perm.tolist()]
    shards, size = [[]], 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_safetensors(path: Path, specs: list[TensorEntry], seed: int,
                       num_layers: int) -> None:
    # Written by hand rather than with safetensors.save_file, which holds every
    # tensor at once and sorts the data; here the data follows ``specs`` in order.
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            f.write(_raw_bytes(_generate(spec, seed, num_layers)))


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A CPU tensor's bytes as stored, without numpy (not a dependency of loadfsm)."""
    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), nbytes(tensor))


def load_reference_model(config: ModelConfig | str, seed: int = 0,
                         device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The fully materialized model holding exactly the checkpoint of ``seed``.

    The bf16 reference for numerics tests: fused and stacked parameters are filled
    through the model's ``checkpoint_pieces``, padding rows are zero, absent kv
    scales take ``DEFAULT_KV_SCALE``, rotary tables are computed. Tensors are
    generated one at a time into place. Returns the model in eval mode.
    """
    cfg = as_config(config)
    model = build_model(cfg, "meta", dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()   # to_empty gives tied parameters separate storage
    params = dict(model.named_parameters())
    by_ckpt = {piece.ckpt_name: piece for piece in model.checkpoint_pieces()}
    fed = {piece.param for piece in by_ckpt.values()}
    by_ckpt.update((name, Piece(name, name)) for name in params if name not in fed)
    with torch.no_grad():
        for param in params.values():
            param.zero_()
        for spec in checkpoint_layout(cfg):
            piece = by_ckpt.pop(spec.name)
            params[piece.param][piece.region].copy_(_generate(spec, seed, cfg.num_layers))
        for piece in by_ckpt.values():   # absent from the checkpoint: kv scales only
            if not piece.optional:
                raise KeyError(f"checkpoint layout lacks {piece.ckpt_name!r}")
            params[piece.param][piece.region].fill_(DEFAULT_KV_SCALE)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.compute_buffers(device)
    return model.eval()
