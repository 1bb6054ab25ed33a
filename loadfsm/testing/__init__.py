"""Test and demo helpers, not the library (which never imports this package).

Reference models: Llama-style decoders with the layer kinds real engines have (fused
q/k/v and gate/up projections, stacked MoE experts, padded vocabularies, tied embeddings,
an attention layer with optional kv-cache scales), plus seeded bf16 checkpoints in
Hugging Face naming to load into them.
"""

from ..quant.experts import StackedExperts
from .attention import Attention, RotaryEmbedding
from .checkpoint import (ORDERS, checkpoint_layout, load_reference_model,
                         reference_state_dict, write_checkpoint)
from .config import CONFIGS, ModelConfig, as_config
from .engine_llama import EngineLlamaForCausalLM
from .layers import RMSNorm
from .llama import DecoderLayer, LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from .moe import MoEForCausalLM, SparseMoeBlock
from .registry import MODEL_NAMES, build_model, model_class

__all__ = [
    "Attention", "CONFIGS", "DecoderLayer", "EngineLlamaForCausalLM",
    "LlamaAttention",
    "LlamaForCausalLM", "LlamaMLP", "LlamaModel", "MODEL_NAMES", "MoEForCausalLM",
    "ModelConfig", "ORDERS", "RMSNorm", "RotaryEmbedding", "SparseMoeBlock",
    "StackedExperts", "as_config", "build_model", "checkpoint_layout",
    "load_reference_model", "model_class", "reference_state_dict", "write_checkpoint",
]
