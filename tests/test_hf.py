"""Hugging Face transformers models through loadfsm.hf: tiny configs saved with
``save_pretrained`` in bf16, sharded with an index, loaded layer by layer."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig,  # noqa: E402
                          MixtralConfig, Qwen2MoeConfig)

import loadfsm  # noqa: E402
import loadfsm.hf  # noqa: E402
from loadfsm.integrations.hf_experts import Fp8Experts  # noqa: E402
from loadfsm.quant.fp8 import sqnr_db  # noqa: E402
from loadfsm.quant.linear import Fp8Linear  # noqa: E402
from loadfsm.sources.checkpoint_files import INDEX_NAME  # noqa: E402

_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
_DECODER = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": (lambda: LlamaConfig(**_DECODER, intermediate_size=128,
                                  tie_word_embeddings=False), AutoModelForCausalLM),
    "mixtral": (lambda: MixtralConfig(**_DECODER, intermediate_size=96, num_local_experts=4,
                                      num_experts_per_tok=2, tie_word_embeddings=True),
                AutoModelForCausalLM),
    "qwen2_moe": (lambda: Qwen2MoeConfig(**_DECODER, intermediate_size=96,
                                         moe_intermediate_size=48, num_experts=4,
                                         num_experts_per_tok=2,
                                         shared_expert_intermediate_size=96),
                  AutoModelForCausalLM),
    "bert": (lambda: BertConfig(**_SMALL, intermediate_size=128, max_position_embeddings=64),
             AutoModel),
}
DECODERS = ["llama", "mixtral", "qwen2_moe"]
MOES = ["mixtral", "qwen2_moe"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each architecture saved in bf16 with 100KB shards and an index."""
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name, (make_config, auto) in CONFIGS.items():
        torch.manual_seed(0)
        model = auto.from_config(make_config(), dtype=torch.bfloat16)
        model.save_pretrained(root / name, max_shard_size="100KB")
        assert (root / name / INDEX_NAME).exists()
        paths[name] = root / name
    return paths


def _reference(path, name):
    return CONFIGS[name][1].from_pretrained(path, dtype=torch.bfloat16).eval()


def _output(model, name):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(tokens)
    return (out.last_hidden_state if name == "bert" else out.logits).float()


def _rewrite(src, dst, drop=(), add=None):
    """Copy a sharded checkpoint without the tensors ``drop``, with ``add`` in its first shard."""
    shutil.copytree(src, dst)
    index_file = dst / INDEX_NAME
    index = json.loads(index_file.read_text())
    files = sorted(set(index["weight_map"].values()))
    for file in files:
        tensors = load_file(dst / file)
        tensors = {k: v for k, v in tensors.items() if k not in drop}
        if file == files[0]:
            tensors.update(add or {})
            index["weight_map"].update({k: file for k in add or {}})
        save_file(tensors, dst / file, metadata={"format": "pt"})
    for name in drop:
        del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_layer_finalized_and_forward_runs(checkpoints, name):
    """Every layer ends FINALIZED, nothing stays on meta, and the model's forward runs."""
    model, report = loadfsm.hf.from_pretrained(checkpoints[name], device="cpu")
    assert report.states["FINALIZED"] == len(report.layer_states)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    assert torch.isfinite(_output(model, name)).all()


@pytest.mark.parametrize("name", DECODERS)
def test_generate_produces_tokens(checkpoints, name):
    """A loaded FP8 decoder generates new tokens with the model's own generate."""
    model, _ = loadfsm.hf.from_pretrained(checkpoints[name], device="cpu")
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8) and torch.equal(out[:, :4], prompt)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp8_output_sqnr_against_transformers(checkpoints, name):
    """FP8 logits (hidden states for the encoder) vs transformers' bf16 model: >= 25 dB."""
    model, _ = loadfsm.hf.from_pretrained(checkpoints[name], device="cpu")
    ref = _output(_reference(checkpoints[name], name), name)
    assert sqnr_db(ref, _output(model, name)) >= 25.0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_path_bit_identical_to_from_pretrained(checkpoints, name):
    """quant=None gives every state_dict tensor and buffer of transformers' from_pretrained."""
    model, _ = loadfsm.hf.from_pretrained(checkpoints[name], quant=None, device="cpu")
    ref = _reference(checkpoints[name], name)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    ref_buffers = dict(ref.named_buffers())
    for key, value in model.named_buffers():
        assert torch.equal(value, ref_buffers[key]), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peak_bound(checkpoints, name):
    """Ledger peak <= final + largest layer staging + 5%."""
    _, report = loadfsm.hf.from_pretrained(checkpoints[name], device="cpu")
    assert report.peak_bytes <= (report.final_bytes + report.largest_layer_bytes) * 1.05


@pytest.mark.parametrize("name", MOES)
def test_experts_fp8_routers_and_lm_head_full_precision(checkpoints, name):
    """Fused experts become Fp8Experts; routers and lm_head keep bf16."""
    model, _ = loadfsm.hf.from_pretrained(checkpoints[name], device="cpu")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, Fp8Experts)
    assert mlp.gate.weight.dtype == torch.bfloat16
    assert type(model.lm_head) is torch.nn.Linear


def test_exclude_keeps_named_linears_full_precision(checkpoints):
    """A module named in exclude stays an nn.Linear in bf16."""
    model, _ = loadfsm.hf.from_pretrained(checkpoints["llama"], device="cpu",
                                          exclude=("lm_head", "*.self_attn.o_proj"))
    attn = model.model.layers[1].self_attn
    assert type(attn.o_proj) is torch.nn.Linear and isinstance(attn.q_proj, Fp8Linear)


def test_tied_embeddings_share_one_storage(checkpoints):
    """tie_word_embeddings: lm_head and embed_tokens end as one tensor."""
    model, report = loadfsm.hf.from_pretrained(checkpoints["mixtral"], device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert report.tied == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("name, missing", [
    ("llama", "model.layers.1.mlp.up_proj.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
    ("qwen2_moe", "model.layers.0.mlp.experts.1.gate_proj.weight"),
], ids=["dense", "mixtral-expert", "qwen-expert"])
def test_missing_tensor_raises_naming_it(checkpoints, tmp_path, name, missing):
    """A tensor absent from the checkpoint (one expert of a fused parameter included) raises."""
    path = _rewrite(checkpoints[name], tmp_path / "ckpt", drop=[missing])
    with pytest.raises(loadfsm.IncompleteLoadError, match=missing.replace(".", r"\.")) as err:
        loadfsm.hf.from_pretrained(path, device="cpu")
    assert any(missing in names for names in err.value.missing.values())


def test_keys_the_model_ignores_load_and_others_raise(checkpoints, tmp_path):
    """Legacy rotary inv_freq is ignored as transformers ignores it; an unknown name raises."""
    stale = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    model, report = loadfsm.hf.from_pretrained(
        _rewrite(checkpoints["llama"], tmp_path / "ok", add=stale), device="cpu")
    assert report.unexpected == []
    bogus = {"model.layers.0.mlp.extra.weight": torch.ones(8)}
    with pytest.raises(loadfsm.UnexpectedWeightError, match="extra"):
        loadfsm.hf.from_pretrained(_rewrite(checkpoints["llama"], tmp_path / "bad", add=bogus),
                                   device="cpu")


def test_import_loadfsm_does_not_need_transformers():
    """import loadfsm (and loadfsm.hf) leaves transformers unimported."""
    code = "import sys, loadfsm, loadfsm.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_source_wrapper_hands_tensors_over_like_its_source(checkpoints):
    """The transformers path's source keeps ``owned_arrivals`` (a GPU load keeps the device
    tensors its source assembles as the layers' storage, as ``loadfsm.load`` does)."""
    from loadfsm.integrations.hf import _Ignoring
    from loadfsm.sources.safetensors_dir import SafetensorsSource
    for device in ("cpu", "cuda"):       # the flag only: no CUDA call is made
        source = SafetensorsSource(checkpoints["llama"], device=device)
        assert _Ignoring(source, set()).owned_arrivals is (device == "cuda")
        source.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_keeps_the_tensors_its_source_assembles(checkpoints, monkeypatch):
    import loadfsm.sources.safetensors_dir as safetensors_dir
    from loadfsm.loading.driver import ArrivalDriver
    monkeypatch.setattr(safetensors_dir, "RING_BYTES", 4 << 10)   # every large tensor chunked
    aliased = []
    real = ArrivalDriver._materialize
    monkeypatch.setattr(ArrivalDriver, "_materialize", lambda self, rec, alias=None: (
        aliased.append(rec.name) if alias is not None else None, real(self, rec, alias))[1])
    loaded = loadfsm.hf.from_pretrained(checkpoints["llama"], device="cuda")
    assert "model.embed_tokens" in aliased and "lm_head" in aliased
    expected = _reference(checkpoints["llama"], "llama")
    assert torch.equal(loaded.model.model.embed_tokens.weight.cpu(),
                       expected.model.embed_tokens.weight)

