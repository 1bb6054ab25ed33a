"""Tiny checkpoints written by transformers' ``save_pretrained`` and vLLM's own model
classes built from them (on ``meta`` for loadfsm, on CPU for vLLM's reference load),
and the helpers the test modules share (imported, never from conftest)."""

from __future__ import annotations

import contextlib
import os
import socket

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch
from safetensors.torch import load_file

_COMMON = dict(vocab_size=250, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, head_dim=16,
               tie_word_embeddings=False)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=128)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, **_MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2)),
}
MODELS = tuple(CONFIGS)


def write_checkpoint(kind: str, path, seed: int = 0) -> str:
    import transformers
    config_cls, model_cls, extra = CONFIGS[kind]
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_config(ckpt: str, forward: bool = False):
    from vllm.config import (CompilationConfig, DeviceConfig, LoadConfig, ModelConfig,
                             VllmConfig)
    extra = {"compilation_config": CompilationConfig(custom_ops=["none"])} if forward else {}
    return VllmConfig(model_config=ModelConfig(model=ckpt, dtype="bfloat16",
                                               skip_tokenizer_init=True, enforce_eager=True),
                      device_config=DeviceConfig("cpu"), load_config=LoadConfig(), **extra)


def init_distributed(config) -> None:
    """Once per process, with a MoE config current (else no expert-parallel group)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
                                     backend="gloo")
        ensure_model_parallel_initialized(1, 1)


def build(ckpt: str, device: str, forward: bool = False):
    """vLLM's model class for ``ckpt`` on ``device`` ("meta" or "cpu"), in bf16, and its
    config (fresh per model: vLLM registers every attention layer's name in it)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype
    config = vllm_config(ckpt, forward)
    with set_current_vllm_config(config), set_default_torch_dtype(torch.bfloat16), \
            torch.device(device):
        return initialize_model(vllm_config=config), config


@contextlib.contextmanager
def current(config):
    from vllm.config import set_current_vllm_config
    with set_current_vllm_config(config):
        yield


def weights(ckpt: str):
    """The checkpoint's tensors, as vLLM's ``load_weights`` takes them."""
    return list(load_file(f"{ckpt}/model.safetensors").items())


def vllm_load(ckpt: str, forward: bool = False):
    model, config = build(ckpt, "cpu", forward)
    with current(config):
        names = model.load_weights(weights(ckpt))
    return model, names


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
