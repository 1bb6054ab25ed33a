"""Kv-cache scale names and their default, for the handler, the engine layouts and the
reference attention alike.

FP8-KV checkpoints carry ``k_scale`` / ``v_scale`` (sometimes ``q_scale``) per attention
layer; bf16 checkpoints carry none. vLLM's ``Attention`` keeps its scales as buffers
(``_k_scale``, ``_v_scale``, ``_q_scale``, ``_prob_scale``). A scale that does not arrive
is 1.0: the cache stores values unscaled, as vLLM does by default.
"""

from __future__ import annotations

CHECKPOINT_KV_SCALES = ("k_scale", "v_scale", "q_scale")
VLLM_KV_SCALES = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")
KV_SCALE_NAMES = CHECKPOINT_KV_SCALES + VLLM_KV_SCALES
DEFAULT_KV_SCALE = 1.0
