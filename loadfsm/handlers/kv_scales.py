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

_SCALES = frozenset(KV_SCALE_NAMES)


class KvScalesHandler(Handler):
    """Loads kv-cache scales, defaulting absent ones to ``DEFAULT_KV_SCALE``."""

    name = "kv_scales"

    def defaults(self, rec, pieces) -> None:
        for piece in pieces:
            attr = rec.slot_attr(piece.param)
            rec.staging[attr][piece.region].fill_(DEFAULT_KV_SCALE)


def holds_only_kv_scales(name: str, module: nn.Module) -> bool:
    """Modules whose loadable tensors are all kv-cache scales. Asked of every module a
    plan meets: the first tensor that is not a scale answers (100k-layer plans)."""
    found = False
    for attr, param in module._parameters.items():
        if param is not None:
            if attr not in _SCALES:
                return False
            found = True
    for attr, buf in module._buffers.items():
        if buf is not None and attr not in module._non_persistent_buffers_set:
            if attr not in _SCALES:
                return False
            found = True
    return found


register_handler(KvScalesHandler(), when=holds_only_kv_scales)
