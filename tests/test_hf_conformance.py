"""Conformance matrix: transformers' own model families through ``loadfsm.hf``.

Each family is a tiny config built by transformers, saved with ``save_pretrained`` in
bf16 (sharded, with an index), and held to four promises: ``quant=None`` is
bit-identical to transformers' ``from_pretrained``; FP8 logits are >= 25 dB SQNR against
it; a trainer's push (a second model of the class, another seed) re-quantizes in place
to exactly a fresh FP8 load of its weights; the same push in checkpoint names (per-expert
tensors for MoE files) does too. One checkpoint pair per family per test session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

import loadfsm  # noqa: E402
import loadfsm.hf  # noqa: E402
from loadfsm.integrations.hf_experts import Fp8Experts  # noqa: E402
from loadfsm.quant.fp8 import sqnr_db  # noqa: E402
from loadfsm.sources.checkpoint_files import INDEX_NAME  # noqa: E402
from checks import addresses, assert_same_tensors  # noqa: E402

_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                intermediate_size=128)
_MOE = dict(num_experts_per_tok=2)


@dataclass(frozen=True)
class Family:
    """One transformers model family: its config arguments and what it exercises."""

    model_type: str
    config: dict
    moe: bool = False
    encoder: bool = False
    # Random tiny weights of post-norm families (and GPT-OSS's near-tied random routers)
    # make each block overwrite the residual stream, which no trained model does: the
    # FP8 error then compounds to ~22 dB. These get ``_trained_like`` weights.
    trained_like: bool = False
    # Experts transformers keeps in a layout loadfsm does not quantize (transposed,
    # with biases and a clamped gate): they load and push in bf16.
    bf16_experts: bool = False
    tags: tuple[str, ...] = field(default=())


FAMILIES = [
    Family("llama", _DECODER),
    Family("mistral", _DECODER),
    Family("qwen2", _DECODER, tags=("qkv-bias",)),
    Family("qwen3", dict(_DECODER, head_dim=16, tie_word_embeddings=True), tags=("tied",)),
    Family("gemma2", dict(_DECODER, head_dim=16), trained_like=True, tags=("tied",)),
    Family("gemma3_text", dict(_DECODER, head_dim=16), trained_like=True, tags=("tied",)),
    Family("phi3", dict(_DECODER, pad_token_id=0)),
    Family("granite", _DECODER),
    Family("olmo2", _DECODER, trained_like=True),
    Family("stablelm", _DECODER),
    Family("gpt_neox", _DECODER),
    Family("bert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, intermediate_size=128, max_position_embeddings=64),
           encoder=True),
    Family("mixtral", dict(_DECODER, num_local_experts=4, **_MOE), moe=True),
    Family("qwen2_moe", dict(_DECODER, num_experts=4, moe_intermediate_size=48,
                             shared_expert_intermediate_size=96, **_MOE), moe=True),
    Family("qwen3_moe", dict(_DECODER, num_experts=4, moe_intermediate_size=48, head_dim=16,
                             **_MOE), moe=True),
    Family("olmoe", dict(_DECODER, num_experts=4, **_MOE), moe=True),
    Family("deepseek_v3", dict(_DECODER, n_routed_experts=4, moe_intermediate_size=48,
                               n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                               q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                               v_head_dim=16, n_group=1, topk_group=1, **_MOE), moe=True),
    Family("gpt_oss", dict(_DECODER, num_local_experts=4, head_dim=16, sliding_window=32,
                           layer_types=["sliding_attention", "full_attention"], **_MOE),
           moe=True, trained_like=True, bf16_experts=True),
]
IDS = [f.model_type for f in FAMILIES]
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _trained_like(model) -> None:
    """Unit-RMS token embeddings and halved norm gains: each block's update is a part of
    the residual stream, as in a trained model, instead of replacing it."""
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(
            0, 1.0, generator=torch.Generator().manual_seed(0))
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight") and (p == 1).all():
                p.mul_(0.5)


@dataclass
class Checkpoints:
    """A family's two checkpoints: the one loaded (seed 0) and the trainer's (seed 1)."""

    family: Family
    path: Path
    trainer: torch.nn.Module
    trainer_path: Path

    def auto(self):
        return AutoModel if self.family.encoder else AutoModelForCausalLM

    def reference(self):
        return self.auto().from_pretrained(self.path, dtype=torch.bfloat16).eval()


class _Store:
    """Checkpoints built on first use, once per test session."""

    def __init__(self, root: Path):
        self.root, self._made = root, {}

    def __call__(self, family: Family) -> Checkpoints:
        if family.model_type not in self._made:
            self._made[family.model_type] = self._make(family)
        return self._made[family.model_type]

    def _make(self, family: Family) -> Checkpoints:
        auto = AutoModel if family.encoder else AutoModelForCausalLM
        config = AutoConfig.for_model(family.model_type, **family.config)
        paths = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = auto.from_config(config, dtype=torch.bfloat16)
            if family.trained_like:
                _trained_like(model)
            path = self.root / f"{family.model_type}-{seed}"
            model.save_pretrained(path, max_shard_size="100KB")
            assert (path / INDEX_NAME).exists()
            paths.append(path)
        return Checkpoints(family, paths[0], model, paths[1])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return _Store(tmp_path_factory.mktemp("hf_families"))


def _logits(model, family: Family) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return (out.last_hidden_state if family.encoder else out.logits).float()


def _trainer_tensors(trainer):
    """What a trainer sends: its parameters, and the persistent buffers of its state
    (DeepSeek-V3's router ``e_score_correction_bias`` is a buffer, updated by training)."""
    yield from trainer.named_parameters()
    persistent = set(trainer.state_dict())
    yield from ((n, b) for n, b in trainer.named_buffers() if n in persistent)


def _checkpoint_tensors(path: Path):
    """Every tensor of a sharded checkpoint under its file name (the saved state dict)."""
    index = json.loads((path / INDEX_NAME).read_text())
    for file in sorted(set(index["weight_map"].values())):
        yield from load_file(path / file).items()


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_bf16_bit_identical_to_from_pretrained(checkpoints, family):
    """quant=None: every parameter, buffer and logit equals transformers' from_pretrained."""
    ckpt = checkpoints(family)
    model, report = loadfsm.hf.from_pretrained(ckpt.path, quant=None, device="cpu")
    ref = ckpt.reference()
    assert report.states["FINALIZED"] == len(report.layer_states)
    assert_same_tensors(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert_same_tensors(dict(model.named_buffers()), dict(ref.named_buffers()))
    assert torch.equal(_logits(model, family), _logits(ref, family))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_fp8_logits_sqnr_against_from_pretrained(checkpoints, family):
    """FP8 (per tensor) logits, hidden states for the encoder: >= 25 dB against bf16."""
    ckpt = checkpoints(family)
    model, _ = loadfsm.hf.from_pretrained(ckpt.path, quant="fp8", device="cpu")
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    assert bool(experts) == (family.moe and not family.bf16_experts)
    assert sqnr_db(_logits(ckpt.reference(), family), _logits(model, family)) >= 25.0


@pytest.mark.parametrize("quant", ["fp8", "fp8-channel", "fp8-block"])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_trainer_push_equals_fresh_fp8_load(checkpoints, family, quant):
    """WeightSync(model) of a trainer's parameters: bit-identical to a fresh FP8 load of
    them, and no live tensor moved."""
    ckpt = checkpoints(family)
    model, _ = loadfsm.hf.from_pretrained(ckpt.path, quant=quant, device="cpu")
    before = addresses(model)
    loadfsm.WeightSync(model).push(_trainer_tensors(ckpt.trainer))
    fresh, _ = loadfsm.hf.from_pretrained(ckpt.trainer_path, quant=quant, device="cpu")
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert addresses(model) == before
    assert torch.equal(_logits(model, family), _logits(fresh, family))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_named_parameters_push_keeps_the_engines_buffers(checkpoints, family):
    """``push(trainer.named_parameters())`` alone, the form the issue names: parameters
    equal a fresh FP8 load of the trainer's, persistent buffers keep the engine's values."""
    ckpt = checkpoints(family)
    model, _ = loadfsm.hf.from_pretrained(ckpt.path, quant="fp8", device="cpu")
    buffers = {n: b.clone() for n, b in model.named_buffers() if n in model.state_dict()}
    before = addresses(model)
    loadfsm.WeightSync(model).push(ckpt.trainer.named_parameters())
    fresh, _ = loadfsm.hf.from_pretrained(ckpt.trainer_path, quant="fp8", device="cpu")
    assert_same_tensors(model.state_dict(), {**fresh.state_dict(), **buffers})
    assert addresses(model) == before


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_checkpoint_names_push_equals_fresh_fp8_load(checkpoints, family):
    """A push of the trainer's saved state dict (per-expert names for MoE files), through
    the load's report: bit-identical to a fresh FP8 load, no live tensor moved."""
    ckpt = checkpoints(family)
    model, report = loadfsm.hf.from_pretrained(ckpt.path, quant="fp8", device="cpu")
    before = addresses(model)
    loadfsm.WeightSync(model, session=report).push(_checkpoint_tensors(ckpt.trainer_path))
    fresh, _ = loadfsm.hf.from_pretrained(ckpt.trainer_path, quant="fp8", device="cpu")
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert addresses(model) == before


def test_replanned_moe_keeps_its_experts_handler(checkpoints):
    """Re-planning a loaded MoE model gives its Fp8Experts back to the HF experts handler."""
    ckpt = checkpoints(next(f for f in FAMILIES if f.model_type == "mixtral"))
    model, _ = loadfsm.hf.from_pretrained(ckpt.path, quant="fp8", device="cpu")
    session = loadfsm.LoadSession.for_loaded_model(model)
    handlers = {rec.handler.name for name, rec in session.plan.layers.items()
                if name.endswith("mlp.experts")}
    assert handlers == {"hf_experts_fp8"}


def test_matrix_covers_the_promised_families():
    """>= 12 families: >= 4 with quantized experts, qkv bias, tied embeddings, an encoder."""
    assert len(FAMILIES) >= 12
    assert sum(f.moe and not f.bf16_experts for f in FAMILIES) >= 4
    assert any(f.encoder for f in FAMILIES)
    assert {"qkv-bias", "tied"} <= {t for f in FAMILIES for t in f.tags}
