"""Hugging Face Llama checkpoints for benchmarks: seeded bf16 safetensors shards, their
index and a ``config.json`` that transformers and ``loadfsm.hf`` both read.

The weights come from ``loadfsm.testing.write_checkpoint`` (HF naming, trained-model-like
scales, one writer thread per shard: tensor generation and file writes release the GIL).
The config is written by hand in the form Meta's Llama-3-8B ships (``rope_theta`` and
``torch_dtype`` at the top level), which every transformers release reads; the writer
needs no transformers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from loadfsm.sources.checkpoint_files import INDEX_NAME
from loadfsm.sources.dtypes import NAMES
from loadfsm.testing import ModelConfig, as_config, checkpoint_layout, write_checkpoint

CONFIG_NAME = "config.json"

# The fields of ``config.json`` that fix the shapes: a cached checkpoint is reused only
# when these match the ones asked for.
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size")


def llama_8b_config(*, layers: int = 32, hidden: int | None = None,
                    intermediate: int | None = None, heads: int | None = None,
                    kv_heads: int | None = None, vocab: int | None = None) -> ModelConfig:
    """Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 / 8 heads, vocab 128256),
    any of them overridden (small shapes make a CPU run)."""
    base = as_config("llama-8b")
    return replace(base, num_layers=layers, hidden_size=hidden or base.hidden_size,
                   intermediate_size=intermediate or base.intermediate_size,
                   num_heads=heads or base.num_heads, num_kv_heads=kv_heads or base.num_kv_heads,
                   vocab_size=vocab or base.vocab_size, head_dim=None)


def hf_config(config: ModelConfig) -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` with ``config``'s shapes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_eps, "rope_theta": config.rope_theta,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "bfloat16",
    }


def write_hf_checkpoint(config: ModelConfig, directory: str | Path, *,
                        max_shard_bytes: int = 5 << 30) -> Path:
    """Write ``config``'s seed-0 weights as sharded safetensors, the index and
    ``config.json`` into ``directory``; the config last, so a directory with one holds a
    whole checkpoint."""
    directory = Path(directory)
    write_checkpoint(config, directory, max_shard_bytes=max_shard_bytes)
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config(config), indent=2) + "\n")
    return directory


def cached(config: ModelConfig, directory: str | Path) -> bool:
    """Whether ``directory`` already holds the checkpoint of ``config``: one written here,
    or one ``write_checkpoint`` wrote with the same shapes (``gpu_run.sh``'s), which is
    given its ``config.json`` here. ``False``: absent or empty, free to write.

    Raises:
        ValueError: it holds a checkpoint of other shapes (written by an earlier run with
            other options), or files that are no whole checkpoint (a write cut short):
            a directory with files in it is never written over.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if path.exists():
        found, wanted = json.loads(path.read_text()), hf_config(config)
        differ = {k: (found.get(k), wanted[k]) for k in _SHAPE_KEYS
                  if found.get(k) != wanted[k]}
        if differ:
            raise ValueError(f"{directory} holds a checkpoint of other shapes "
                             f"(found, wanted): {differ}; pass another --dir")
        return True
    if (directory / INDEX_NAME).exists():
        _check_tensors(config, directory)
        path.write_text(json.dumps(hf_config(config), indent=2) + "\n")
        return True
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} has files but no {CONFIG_NAME} or {INDEX_NAME}; "
                         "remove it or pass another --dir")
    return False


def _check_tensors(config: ModelConfig, directory: Path) -> None:
    """Raise ``ValueError`` unless the shards' headers list exactly ``config``'s tensors,
    shapes and dtypes."""
    wanted = {s.name: (list(s.shape), NAMES[s.dtype]) for s in checkpoint_layout(config)}
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                found[name] = (tensor.get_shape(), tensor.get_dtype())
    differ = sorted(n for n in wanted.keys() | found.keys() if wanted.get(n) != found.get(n))
    if differ:
        raise ValueError(f"{directory} holds other tensors than the checkpoint asked for "
                         f"({len(differ)} differ, first {differ[0]!r}: found "
                         f"{found.get(differ[0])}, wanted {wanted.get(differ[0])}); "
                         "pass another --dir")
