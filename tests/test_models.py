"""Reference models, their checkpoint pieces and the seeded checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from loadfsm.sources.checkpoint_files import INDEX_NAME
from loadfsm.testing import (MODEL_NAMES, ORDERS, LlamaForCausalLM, ModelConfig, MoEForCausalLM,
                            RotaryEmbedding, build_model, checkpoint_layout,
                            load_reference_model, reference_state_dict, write_checkpoint)

TINY = ["tiny", "tiny-moe", "tiny-tied", "tiny-padded"]
KV_SCALES = dataclasses.replace(ModelConfig.from_name("tiny"), kv_cache_scales=True)
PIECE_CASES = [*TINY, KV_SCALES]
PIECE_IDS = [*TINY, "tiny-kv-scales"]


def _input_ids(config: ModelConfig, batch: int = 2, seq: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=gen)


def _config(case) -> ModelConfig:
    return case if isinstance(case, ModelConfig) else ModelConfig.from_name(case)


def _read_dir(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} in two files"
                tensors[name] = f.get_tensor(name)
    return tensors


def _file_of(directory) -> dict[str, str]:
    return json.loads((directory / INDEX_NAME).read_text())["weight_map"]


# ---- configs -------------------------------------------------------------------------

def test_head_dim_defaults_to_hidden_over_heads():
    """head_dim is hidden_size // num_heads unless given."""
    assert ModelConfig(hidden_size=256, num_heads=4, num_kv_heads=2).head_dim == 64


def test_padded_vocab_rounds_up():
    """padded_vocab rounds vocab_size up to a multiple of pad_vocab_to."""
    config = ModelConfig.from_name("tiny-padded")
    assert (config.vocab_size, config.padded_vocab) == (4000, 4032)


def test_replace_makes_a_variant():
    """dataclasses.replace gives a validated variant of a named config."""
    config = dataclasses.replace(ModelConfig.from_name("tiny"), num_layers=2)
    assert config.num_layers == 2 and config.hidden_size == 512


@pytest.mark.parametrize("bad", [
    {"num_layers": 0}, {"num_kv_heads": 3}, {"head_dim": 7}, {"pad_vocab_to": 0},
    {"num_experts": 4, "experts_per_token": 5, "moe_intermediate_size": 64},
    {"num_experts": 4, "experts_per_token": 2},
], ids=["no-layers", "heads-not-multiple", "odd-head-dim", "zero-pad", "top-k-too-big",
        "no-moe-intermediate"])
def test_invalid_config_raises(bad):
    """An inconsistent config raises ValueError."""
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_unknown_name_raises():
    """from_name with an unknown name raises ValueError."""
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_name("gpt-17")


# ---- building ------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_on_meta(name):
    """Every named model builds on meta with no storage."""
    model = build_model(name)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", TINY)
def test_builds_on_cpu_and_runs(name):
    """A model built on CPU runs forward to logits [B, S, vocab_size]."""
    model = build_model(name, "cpu")
    config = model.config
    assert model(_input_ids(config)).shape == (2, 12, config.vocab_size)


def test_model_class_follows_num_experts():
    """build_model picks MoEForCausalLM for expert configs, LlamaForCausalLM otherwise."""
    assert type(build_model("tiny-moe")) is MoEForCausalLM
    assert type(build_model("tiny")) is LlamaForCausalLM


def test_tied_lm_head_is_the_embedding():
    """With tie_embeddings lm_head.weight is the embedding Parameter itself."""
    model = load_reference_model("tiny-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_parameters_use_hf_names():
    """Parameter names follow the Hugging Face prefix layout."""
    names = {name for name, _ in build_model("tiny").named_parameters()}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.layers.3.mlp.gate_up_proj.weight"} <= names


# ---- reference model -----------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_reference_model_logits_are_finite(name):
    """load_reference_model gives finite logits of shape [B, S, vocab_size]."""
    config = ModelConfig.from_name(name)
    logits = load_reference_model(config)(_input_ids(config))
    assert logits.shape == (2, 12, config.vocab_size) and logits.isfinite().all()


def test_reference_model_holds_checkpoint_tensors():
    """Fused and stacked rows of the reference model equal the checkpoint tensors."""
    sd = reference_state_dict("tiny-moe")
    layer = load_reference_model("tiny-moe").model.layers[1]
    q_rows = layer.self_attn.q_size
    assert torch.equal(layer.self_attn.qkv_proj.weight[:q_rows],
                       sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(layer.mlp.experts.gate_up_proj[2, 512:],
                       sd["model.layers.1.mlp.experts.2.up_proj.weight"])
    assert torch.equal(layer.mlp.experts.down_proj[3],
                       sd["model.layers.1.mlp.experts.3.down_proj.weight"])


def test_reference_model_zeroes_padding_rows():
    """Vocab padding rows of the reference model are zero."""
    model = load_reference_model("tiny-padded")
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert weight[4000:].eq(0).all() and weight[:4000].ne(0).any()


def test_absent_kv_scales_default_to_one():
    """Without kv scales in the checkpoint the attention scales are 1.0."""
    attn = load_reference_model("tiny").model.layers[0].self_attn.attn
    assert (attn.k_scale.item(), attn.v_scale.item(), attn.q_scale.item()) == (1.0, 1.0, 1.0)


def test_kv_scales_load_from_checkpoint():
    """Checkpoint kv scales land in self_attn.attn as float32 scalars."""
    sd = reference_state_dict(KV_SCALES)
    attn = load_reference_model(KV_SCALES).model.layers[2].self_attn.attn
    assert attn.v_scale.dtype == torch.float32
    assert torch.equal(attn.v_scale, sd["model.layers.2.self_attn.v_scale"])


def test_kv_scales_do_not_change_logits_without_fp8_cache():
    """With fp8_kv_cache off the logits do not depend on the kv scales."""
    config = ModelConfig.from_name("tiny")
    plain = load_reference_model(config)(_input_ids(config))
    assert torch.equal(plain, load_reference_model(KV_SCALES)(_input_ids(config)))


def test_fp8_kv_cache_stays_close_to_bf16():
    """With fp8_kv_cache the logits stay close to bf16 (SQNR >= 25 dB) but differ."""
    config = dataclasses.replace(KV_SCALES, fp8_kv_cache=True)
    ref = load_reference_model("tiny")(_input_ids(config)).float()
    out = load_reference_model(config)(_input_ids(config)).float()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert not torch.equal(ref, out) and sqnr >= 25


# ---- checkpoint pieces ---------------------------------------------------------------

def _with_identity(model):
    """The model's pieces plus a whole-tensor piece for every parameter they do not name."""
    pieces = list(model.checkpoint_pieces())
    named = {piece.param for piece in pieces}
    identity = [(name, name, ()) for name, _ in model.named_parameters() if name not in named]
    return [(p.ckpt_name, p.param, p.region) for p in pieces] + identity, pieces


@pytest.mark.parametrize("case", PIECE_CASES, ids=PIECE_IDS)
def test_pieces_cover_each_parameter_once(case):
    """Pieces plus identity pieces cover every parameter element once, padding never."""
    config = _config(case)
    model = build_model(config, "cpu")
    params = dict(model.named_parameters())
    counts = {name: torch.zeros(p.shape, dtype=torch.int32) for name, p in params.items()}
    for _, param, region in _with_identity(model)[0]:
        counts[param][region] += 1
    for name, count in counts.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert count[config.vocab_size:].eq(0).all(), name
            count = count[: config.vocab_size]
        assert count.eq(1).all(), name


@pytest.mark.parametrize("case", PIECE_CASES, ids=PIECE_IDS)
def test_pieces_match_checkpoint_names_and_shapes(case):
    """Every checkpoint tensor feeds one piece whose expected shape is its shape."""
    config = _config(case)
    model = build_model(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    triples, pieces = _with_identity(model)
    optional = {p.ckpt_name for p in pieces if p.optional}
    sd = reference_state_dict(config)
    by_name = {ckpt: (param, region) for ckpt, param, region in triples}
    assert len(by_name) == len(triples)
    assert set(sd) == set(by_name) - (set() if config.kv_cache_scales else optional)
    for name, tensor in sd.items():
        param, region = by_name[name]
        assert torch.empty(shapes[param], device="meta")[region].shape == tensor.shape, name


def test_moe_pieces_name_shard_and_expert():
    """Expert pieces carry shard ids gate/up/down and their expert index."""
    pieces = build_model("tiny-moe").checkpoint_pieces()
    expert = [p for p in pieces if p.ckpt_name.startswith("model.layers.0.mlp.experts.3.")]
    assert sorted((p.shard, p.expert) for p in expert) == [("down", 3), ("gate", 3), ("up", 3)]


# ---- checkpoints on disk -------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_write_checkpoint_round_trips(tmp_path, order):
    """Shards and index read back to exactly the reference tensors, for every order."""
    write_checkpoint("tiny-moe", tmp_path, max_shard_bytes=4 << 20, order=order)
    sd, on_disk = reference_state_dict("tiny-moe"), _read_dir(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert on_disk.keys() == sd.keys() == index["weight_map"].keys()
    assert all(torch.equal(on_disk[name], sd[name]) for name in sd)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sd.values())
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, "pt") as f:
            assert name in f.keys()


def test_shards_respect_max_bytes(tmp_path):
    """Packed orders split into several files none larger than max_shard_bytes."""
    write_checkpoint("tiny", tmp_path, max_shard_bytes=6 << 20)
    sizes = [len(f.read_bytes()) for f in tmp_path.glob("*.safetensors")]
    assert len(sizes) > 2 and max(sizes) <= (6 << 20) + 64 * 1024  # slack for the header


def test_index_false_writes_only_shards(tmp_path):
    """index=False leaves no index file."""
    write_checkpoint("tiny", tmp_path, index=False)
    assert not (tmp_path / INDEX_NAME).exists() and list(tmp_path.glob("*.safetensors"))


def test_interleaved_spreads_a_layer_over_files(tmp_path):
    """order="interleaved" puts consecutive pieces of a fused layer in different files."""
    write_checkpoint("tiny", tmp_path, order="interleaved")
    files = _file_of(tmp_path)
    q, k, v = (files[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q != k and k != v


def test_reversed_starts_with_the_last_layer(tmp_path):
    """order="reversed" writes the last tensors into the first file, first in its data."""
    write_checkpoint("tiny", tmp_path, max_shard_bytes=6 << 20, order="reversed")
    first = tmp_path / "model-00001-of-00006.safetensors"
    header = json.loads(first.read_bytes()[8:8 + int.from_bytes(first.read_bytes()[:8], "little")])
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert by_offset[0][1] == "lm_head.weight"


def test_same_seed_gives_identical_tensors():
    """The same seed gives bit-identical checkpoints."""
    a, b = reference_state_dict("tiny", seed=3), reference_state_dict("tiny", seed=3)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_different_seeds_differ():
    """Different seeds give different tensors."""
    a, b = reference_state_dict("tiny", seed=0), reference_state_dict("tiny", seed=1)
    assert not any(torch.equal(a[name], b[name]) for name in a)


def test_layout_of_big_config_is_multi_gb():
    """llama-8b-4l's checkpoint is a few GB of bf16 (sizes from the layout, no data)."""
    total = sum(spec.nbytes for spec in checkpoint_layout("llama-8b-4l"))
    assert 3.5e9 < total < 4.5e9


# ---- rotary --------------------------------------------------------------------------

def test_rotary_compute_buffers_matches_cpu_build():
    """compute_buffers on a meta-built rotary gives the tables a CPU build has."""
    meta = [m for m in build_model("tiny").modules() if isinstance(m, RotaryEmbedding)]
    cpu = [m for m in build_model("tiny", "cpu").modules() if isinstance(m, RotaryEmbedding)]
    for meta_rotary, cpu_rotary in zip(meta, cpu, strict=True):
        meta_rotary.compute_buffers("cpu")
        assert torch.equal(meta_rotary.cos_cached, cpu_rotary.cos_cached)
        assert torch.equal(meta_rotary.sin_cached, cpu_rotary.sin_cached)


def test_rotary_tables_are_not_in_the_state_dict():
    """Rotary tables are non-persistent: no checkpoint tensor feeds them."""
    assert not any("cached" in name for name in build_model("tiny").state_dict())
