"""Shard layouts of vLLM's own layer classes (vLLM 0.33), for the engine hook.

Imported by ``engine_shards.loader_pieces`` only when ``vllm`` is already imported (a
vLLM model is being loaded): loadfsm never imports vLLM itself. Regions are in the
module's local (tensor-parallel) shapes, read from the attributes vLLM's own loaders use
(``QKVParallelLinear._get_shard_offset_mapping``, ``MergedColumnParallelLinear``'s
``output_sizes // tp_size``, ``RoutedExperts._load_w13``: w1 rows then w3 rows).
"""

from __future__ import annotations

from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from ..loading.writer import register_buffer_init
from ..pieces import rows
from ..quant.kv_cache import VLLM_KV_SCALES
from . import vllm_fp8  # noqa: F401  (vLLM's FP8 layouts register with the handler)
from .engine_shards import LoaderShard, register_shard_layout


def _fused_rows(module, shards: list[tuple[object, int]]) -> list[LoaderShard]:
    out, start = [], 0
    for shard_id, size in shards:
        out += [LoaderShard(attr, shard_id, (rows(start, size),))
                for attr in ("weight", "bias") if getattr(module, attr, None) is not None]
        start += size
    return out


@register_shard_layout(QKVParallelLinear)
def _qkv(m: QKVParallelLinear) -> list[LoaderShard]:
    return _fused_rows(m, [(s, m._get_shard_size_mapping(s)) for s in ("q", "k", "v")])


@register_shard_layout(MergedColumnParallelLinear)
def _merged(m: MergedColumnParallelLinear) -> list[LoaderShard]:
    return _fused_rows(m, [(i, size // m.tp_size) for i, size in enumerate(m.output_sizes)])


@register_shard_layout(RoutedExperts)
def _experts(m: RoutedExperts) -> list[LoaderShard]:
    # w13_weight: [E, 2 * I, H] (w1 = gate rows, then w3 = up rows); w2_weight: [E, H, I]
    half = m.w13_weight.shape[1] // 2
    shards = []
    for e in range(m.w13_weight.shape[0]):
        shards += [LoaderShard("w13_weight", "w1", (e, rows(0, half)), expert=e),
                   LoaderShard("w13_weight", "w3", (e, rows(half, half)), expert=e),
                   LoaderShard("w2_weight", "w2", (e,), expert=e)]
    return shards


@register_shard_layout(Attention)
def _attention(m: Attention) -> list[LoaderShard]:
    return [LoaderShard(name, None, optional=True) for name in VLLM_KV_SCALES
            if name in m._buffers]


@register_buffer_init(RotaryEmbeddingBase)
def _rotary(m: RotaryEmbeddingBase, device) -> None:
    """The non-persistent ``cos_sin_cache``, computed as vLLM's ``__init__`` does (a
    ``meta``-built model has only its shape)."""
    import torch
    dtype = m.cos_sin_cache.dtype
    with torch.device(device):
        m.cos_sin_cache = m._compute_cos_sin_cache().to(dtype)
