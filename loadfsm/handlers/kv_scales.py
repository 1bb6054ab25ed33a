"""Attention layers: fed by no checkpoint weight except optional kv-cache scales.

FP8-KV checkpoints carry ``k_scale`` / ``v_scale`` (and sometimes ``q_scale``);
bf16 checkpoints do not. Either way the layer must end FINALIZED: scales that
arrive are used, absent ones take the documented default of 1.0. vLLM's ``Attention``
keeps them as buffers (``_k_scale``, ``_v_scale``, ``_q_scale``, ``_prob_scale``), 1.0
unless set.
"""

from __future__ import annotations

from .base import Handler, register_handler

SCALE_NAMES = ("k_scale", "v_scale", "q_scale",
               "_k_scale", "_v_scale", "_q_scale", "_prob_scale")
DEFAULT_SCALE = 1.0


@register_handler("kv_scales")
class KvScalesHandler(Handler):
    """Claims modules whose loadable tensors are all kv-cache scales."""

    def claims(self, layer_name, module) -> bool:
        own = [name for name, p in module._parameters.items() if p is not None]
        own += [name for name, b in module._buffers.items()
                if b is not None and name not in module._non_persistent_buffers_set]
        return bool(own) and all(name in SCALE_NAMES for name in own)

    def defaults(self, rec, pieces) -> None:
        for piece in pieces:
            attr = rec.slot_attr(piece.param)
            rec.staging[attr][piece.region].fill_(DEFAULT_SCALE)
