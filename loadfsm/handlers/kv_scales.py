"""Attention layers: fed by no checkpoint weight except optional kv-cache scales.

FP8-KV checkpoints carry ``k_scale`` / ``v_scale`` (and sometimes ``q_scale``);
bf16 checkpoints do not. Either way the layer must end FINALIZED: scales that
arrive are used, absent ones take the documented default of 1.0. vLLM's ``Attention``
keeps them as buffers (``_k_scale``, ``_v_scale``, ``_q_scale``, ``_prob_scale``), 1.0
unless set.
"""

from __future__ import annotations

from torch import nn

from ..quant.kv_cache import DEFAULT_KV_SCALE, KV_SCALE_NAMES
from .base import Handler
from .registry import register_handler


class KvScalesHandler(Handler):
    """Loads kv-cache scales, defaulting absent ones to ``DEFAULT_KV_SCALE``."""

    name = "kv_scales"

    def defaults(self, rec, pieces) -> None:
        for piece in pieces:
            attr = rec.slot_attr(piece.param)
            rec.staging[attr][piece.region].fill_(DEFAULT_KV_SCALE)


def holds_only_kv_scales(name: str, module: nn.Module) -> bool:
    """Modules whose loadable tensors are all kv-cache scales."""
    own = [attr for attr, p in module._parameters.items() if p is not None]
    own += [attr for attr, b in module._buffers.items()
            if b is not None and attr not in module._non_persistent_buffers_set]
    return bool(own) and all(attr in KV_SCALE_NAMES for attr in own)


register_handler(KvScalesHandler(), when=holds_only_kv_scales)
