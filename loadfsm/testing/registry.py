"""Build a reference model by config name or from a config."""

from __future__ import annotations

import torch
from torch import nn

from .config import CONFIGS, ModelConfig, as_config
from .llama import LlamaForCausalLM
from .moe import MoEForCausalLM

MODEL_NAMES: tuple[str, ...] = tuple(CONFIGS)


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    """``MoEForCausalLM`` when the config has experts, else ``LlamaForCausalLM``."""
    return MoEForCausalLM if config.is_moe else LlamaForCausalLM


def build_model(name_or_config: str | ModelConfig, device: torch.device | str = "meta", *,
                dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The reference model for a config, built on ``device``.

    Args:
        name_or_config: a name from ``MODEL_NAMES`` or a ``ModelConfig``.
        device: ``"meta"`` (default) gives shapes only, for a loader to fill; a real
            device gives a randomly initialized model.
        dtype: dtype of weights and norms. Kv-cache scales and rotary tables stay float32.

    Raises:
        ValueError: an unknown config name.
    """
    config = as_config(name_or_config)
    with torch.device(device):
        return model_class(config)(config, dtype=dtype)
