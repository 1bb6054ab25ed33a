"""Tensor parallelism for engine models: the group's rank and size and the collectives
the reference engine layers run (all-reduce after row-parallel, all-gather of logits).

A tensor-parallel engine builds its model with local shapes (a column-parallel weight
``[out / tp, in]``, a row-parallel one ``[out, in / tp]``) and its ``weight_loader``s
narrow each full checkpoint tensor to the rank's part; ``loader_shards`` declare the
local layout. The engine hook needs nothing more: each rank's session plans, stages and
quantizes its own shard. To read only that shard from disk, feed ``load_weights`` with
``loadfsm.sources.safetensors_slices.safetensors_weights(path)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rank_size(group=None) -> tuple[int, int]:
    """``(rank, world size)`` of ``group`` (the default group), ``(0, 1)`` without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` over the group (after a row-parallel matmul). Gloo has no bf16 sum, so
    half-precision tensors are summed in float32 there (exact for two ranks)."""
    if tp_rank_size(group)[1] == 1:
        return x
    if dist.get_backend(group) == "gloo" and x.dtype in (torch.bfloat16, torch.float16):
        wide = x.float()
        dist.all_reduce(wide, group=group)
        return wide.to(x.dtype)
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim (vocab-parallel logits)."""
    size = tp_rank_size(group)[1]
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
