"""Layers in an inference engine's convention (vLLM's), for ``engine_llama``.

Tensor-parallel linears, a vocab-parallel embedding and fused MoE experts whose
parameters carry a ``weight_loader`` set by the layer itself (``param.weight_loader =
self.weight_loader``, as vLLM does). A loader takes the full checkpoint tensor (or a
lazy ``sources.safetensors_slices.LazySlice``) and narrows it to this rank's part; shard ids
are ``"q"/"k"/"v"`` (QKV), ``0/1`` (merged gate/up) and ``"w1"/"w2"/"w3"`` with an
``expert_id`` (fused MoE). ``loader_shards`` declares each layer's local layout for
loadfsm's engine hook; ``fp8_weights`` / ``fp8_config`` let it run FP8 in its own
forward, so the collectives (all-reduce after row-parallel layers, all-gather of
logits) keep running.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..integrations.engine_shards import (LoaderShard, default_weight_loader,
                                          register_shard_layout)
from ..integrations.tp import all_gather_last, all_reduce, tp_rank_size
from ..pieces import rows
from ..quant.experts import StackedExperts
from ..quant.kv_cache import CHECKPOINT_KV_SCALES
from ..quant.linear import fp8_matmul
from .attention import Attention


def _param(shape, dtype, loader, **attrs) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    for key, value in attrs.items():
        setattr(param, key, value)
    return param


@register_shard_layout(Attention)
def _attention_scales(module: Attention):
    # Kv-cache scales: FP8-KV checkpoints carry them, bf16 ones do not (default 1.0).
    return [LoaderShard(name, None, optional=True) for name in CHECKPOINT_KV_SCALES]


class LinearBase(nn.Module):
    """``weight``: [out_local, in_local]; FP8 (with ``weight_scale``) once loadfsm set
    ``fp8_config``."""

    fp8_weights = ("weight",)

    def __init__(self, out_local: int, in_local: int, *, dtype=None, output_dim=None,
                 input_dim=None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.out_dtype = dtype or torch.get_default_dtype()
        self.fp8_config = None
        self.weight = _param((out_local, in_local), dtype, self.weight_loader,
                             output_dim=output_dim, input_dim=input_dim)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        default_weight_loader(param, loaded_weight)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_local] -> [..., out_local]
        if self.fp8_config is None:
            return F.linear(x, self.weight)
        return fp8_matmul(x, self.weight, self.weight_scale, None, self.fp8_config,
                          self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (MoE routers)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=None):
        super().__init__(out_features, in_features, dtype=dtype)


class ColumnParallelLinear(LinearBase):
    """Output rows split over ranks; the output stays split (no gather)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=None):
        tp = tp_rank_size()[1]
        super().__init__(out_features // tp, in_features, dtype=dtype, output_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        size = param.shape[0]
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused (gate/up); shard ids are their indices."""

    def __init__(self, in_features: int, output_sizes: list[int], *, dtype=None):
        super().__init__(in_features, sum(output_sizes), dtype=dtype)
        self.local_sizes = [size // self.tp_size for size in output_sizes]

    def loader_shards(self):
        offsets = [sum(self.local_sizes[:i]) for i in range(len(self.local_sizes))]
        return [LoaderShard("weight", i, (rows(offset, size),))
                for i, (offset, size) in enumerate(zip(offsets, self.local_sizes))]

    def weight_loader(self, param: nn.Parameter, loaded_weight, loaded_shard_id: int) -> None:
        size = self.local_sizes[loaded_shard_id]
        offset = sum(self.local_sizes[:loaded_shard_id])
        shard = loaded_weight.narrow(0, self.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v with heads split over ranks (kv heads replicated when fewer than ranks)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
                 dtype=None):
        tp = tp_rank_size()[1]
        self.num_heads, self.num_kv_heads = num_heads // tp, max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden, (self.q_size + 2 * self.kv_size) * tp, dtype=dtype)

    def _shard(self, shard_id: str) -> tuple[int, int, int]:
        """(offset in the fused weight, rows, which part of the checkpoint tensor)."""
        kv_rank = self.tp_rank // self.kv_replicas
        return {"q": (0, self.q_size, self.tp_rank),
                "k": (self.q_size, self.kv_size, kv_rank),
                "v": (self.q_size + self.kv_size, self.kv_size, kv_rank)}[shard_id]

    def loader_shards(self):
        return [LoaderShard("weight", s, (rows(*self._shard(s)[:2]),)) for s in "qkv"]

    def weight_loader(self, param: nn.Parameter, loaded_weight, loaded_shard_id: str) -> None:
        offset, size, part = self._shard(loaded_shard_id)
        param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, part * size, size))


class RowParallelLinear(LinearBase):
    """Input columns split over ranks; partial outputs are summed (all-reduce)."""

    def __init__(self, in_features: int, out_features: int, *, dtype=None):
        tp = tp_rank_size()[1]
        super().__init__(out_features, in_features // tp, dtype=dtype, input_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        size = param.shape[1]
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.matmul(x))


class VocabParallelEmbedding(nn.Module):
    """Vocab rows (padded to ``pad_to``) split over ranks; rows past the checkpoint's
    vocabulary are padding, which the loader never writes."""

    def __init__(self, vocab_size: int, hidden: int, *, pad_to: int = 64, dtype=None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.vocab_size = vocab_size
        padded = -(-vocab_size // pad_to) * pad_to
        if padded % self.tp_size:
            raise ValueError(f"padded vocab {padded} does not split over {self.tp_size} ranks")
        self.rows = padded // self.tp_size
        self.start = self.tp_rank * self.rows
        self.weight = _param((self.rows, hidden), dtype, self.weight_loader, output_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight) -> None:
        n = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.narrow(0, 0, n).copy_(loaded_weight.narrow(0, self.start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, S] -> [B, S, H]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = (input_ids >= self.start) & (input_ids < self.start + self.rows)
        out = F.embedding((input_ids - self.start) * local, self.weight)
        return all_reduce(out * local.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocab-parallel: local logits, then all-gathered."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, S, H] -> logits [B, S, vocab_size]
        logits = all_gather_last(F.linear(hidden, self.weight))      # [B, S, padded]
        return logits[..., : self.vocab_size]


class FusedMoE(StackedExperts):
    """Experts stacked as vLLM does: ``w13_weight`` [E, 2 * I_local, H] (w1 = gate rows,
    then w3 = up rows), ``w2_weight`` [E, H, I_local]; outputs all-reduced."""

    fp8_weights = ("w13_weight", "w2_weight")
    _ATTRS = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype=None):
        nn.Module.__init__(self)      # StackedExperts.__init__ would allocate its own names
        self.tp_rank, self.tp_size = tp_rank_size()
        local = intermediate // self.tp_size
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, local
        self.out_dtype, self.fp8_config = dtype or torch.get_default_dtype(), None
        self.w13_weight = _param((num_experts, 2 * local, hidden), dtype, self.weight_loader)
        self.w2_weight = _param((num_experts, hidden, local), dtype, self.weight_loader)

    def loader_shards(self):
        size = self.intermediate
        shards = []
        for e in range(self.num_experts):
            shards += [LoaderShard("w13_weight", "w1", (e, rows(0, size)), expert=e),
                       LoaderShard("w13_weight", "w3", (e, rows(size, size)), expert=e),
                       LoaderShard("w2_weight", "w2", (e,), expert=e)]
        return shards

    def weight_loader(self, param: nn.Parameter, loaded_weight, weight_name: str,
                      shard_id: str, expert_id: int) -> None:
        size, start = self.intermediate, self.tp_rank * self.intermediate
        expert = param.data[expert_id]
        if shard_id == "w2":
            expert.copy_(loaded_weight.narrow(1, start, size))
        elif shard_id in ("w1", "w3"):
            offset = 0 if shard_id == "w1" else size
            expert.narrow(0, offset, size).copy_(loaded_weight.narrow(0, start, size))
        else:
            raise ValueError(f"shard_id must be w1, w2 or w3, got {shard_id!r}")

    def expert_linear(self, x: torch.Tensor, which: str, expert: int) -> torch.Tensor:
        name = self._ATTRS[which]
        weight = getattr(self, name)[expert]
        if self.fp8_config is None:
            return F.linear(x, weight)
        return fp8_matmul(x, weight, getattr(self, f"{name}_scale")[expert], None,
                          self.fp8_config, self.out_dtype)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; each rank holds a slice of every expert's intermediate dim.
        return all_reduce(super().forward(x, topk_ids, topk_weights))
