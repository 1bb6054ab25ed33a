"""The dummy load format: seeded random weights through the real machines and handlers."""

import io
import json
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch
from structlog.testing import capture_logs

import loadfsm
from loadfsm.cli import main as cli_main
from loadfsm.testing import CONFIGS, build_model
from loadfsm.quant.linear import Fp8Linear, Fp8StackedExperts
from checks import assert_same_tensors, same

# A config whose attention round-trips q/k/v through fp8 with its kv-cache scales.
KV = replace(CONFIGS["tiny"], kv_cache_scales=True, fp8_kv_cache=True)
MODELS = {"tiny": "tiny", "tiny-moe": "tiny-moe", "kv-scales": KV, "tiny-padded": "tiny-padded",
          "tiny-tied": "tiny-tied"}
QUANTS = ["fp8", None]


def _dummy(config, quant="fp8", seed=0, **kwargs):
    model = build_model(config)
    report = loadfsm.load(model, None, load_format="dummy", quant=quant, device="cpu",
                          seed=seed, **kwargs)
    return model, report


@pytest.mark.parametrize("quant", QUANTS, ids=["fp8", "bf16"])
@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_every_layer_finalized(name, quant):
    """Every layer of each reference model ends FINALIZED; no parameter is left on meta."""
    model, report = _dummy(MODELS[name], quant)
    assert report.states["FINALIZED"] == len(report.layer_states) > 0
    assert not report.missing and not report.unexpected
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_fp8_layers_pass_quantized_with_real_scales(name):
    """With fp8, linears and experts go QUANTIZED -> FINALIZED with finite non-zero scales."""
    with capture_logs() as logs:
        model, _ = _dummy(MODELS[name], "fp8", trace=True)
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8StackedExperts))}
    assert fp8
    quantized = {e["layer"] for e in logs if e["event"] == "layer_transition"
                 and (e["src"], e["dst"]) == ("QUANTIZED", "FINALIZED")}
    assert set(fp8) <= quantized
    for module in fp8.values():
        scales = [p for n, p in module.named_parameters() if n.endswith("_scale")]
        assert scales
        for scale in scales:
            assert bool(torch.isfinite(scale).all()) and bool((scale != 0).all())


def test_dummy_kv_scales_take_their_default():
    """Dummy weights feed no kv-cache scale: attention layers get 1.0 and still run finite."""
    model, report = _dummy(KV, "fp8")
    attn = model.model.layers[0].self_attn.attn
    assert float(attn.k_scale) == float(attn.v_scale) == float(attn.q_scale) == 1.0
    assert "model.layers.0.self_attn.attn" in report.defaulted
    with torch.no_grad():
        logits = model(torch.arange(16).view(1, 16))
    assert bool(torch.isfinite(logits).all())


def test_dummy_padding_rows_are_zero():
    """Dummy weights fill only the rows a checkpoint would hold; padding rows stay zero."""
    model, _ = _dummy("tiny-padded", None)
    vocab = CONFIGS["tiny-padded"].vocab_size
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert bool((weight[vocab:] == 0).all()) and bool((weight[:vocab] != 0).any())


def test_dummy_tied_weights_share_storage():
    """Dummy loading a tied model fills the shared tensor once; both modules see it."""
    model, report = _dummy("tiny-tied", "fp8")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.tied == {"lm_head.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("quant", QUANTS, ids=["fp8", "bf16"])
def test_same_seed_is_bit_identical(quant):
    """Two dummy loads with the same seed give bit-identical tensors."""
    a, b = (_dummy("tiny-moe", quant, seed=3)[0].state_dict() for _ in range(2))
    assert_same_tensors(a, b)


def test_different_seed_differs():
    """Different seeds give different weights in every randomly filled tensor."""
    a, b = (_dummy("tiny", None, seed=seed)[0].state_dict() for seed in (0, 1))
    for key in a:
        if "rotary" not in key and not key.endswith("_scale"):
            assert not same(a[key], b[key]), key


def test_weights_are_small_uniform_in_checkpoint_dtype():
    """Dummy weights are bf16 (the checkpoint dtype), small, uniform and not constant."""
    model, _ = _dummy("tiny", None)
    weight = model.model.layers[0].self_attn.qkv_proj.weight.detach()
    assert weight.dtype == torch.bfloat16
    assert float(weight.abs().max()) <= 1e-3 and float(weight.std()) > 0


@pytest.mark.parametrize("quant", QUANTS, ids=["fp8", "bf16"])
@pytest.mark.parametrize("name", list(MODELS), ids=list(MODELS))
def test_peak_bound_holds(name, quant):
    """Ledger peak <= final + largest layer + 5%, as for a real load; one layer in flight."""
    _, report = _dummy(MODELS[name], quant)
    bound = (report.final_bytes + report.largest_layer_bytes) * 1.05
    assert report.peak_bytes <= bound, (report.peak_bytes, bound)
    assert report.max_layers_in_flight == 1


def test_dummy_rejects_a_source():
    """load_format='dummy' with a checkpoint path is a usage error, not a silent choice."""
    with pytest.raises(ValueError, match="dummy"):
        loadfsm.load(build_model("tiny"), "somewhere/", load_format="dummy", device="cpu")


def test_demo_dummy_json_prints_the_figures():
    """`loadfsm demo --dummy --json` prints one JSON object with the load's figures."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(["demo", "--dummy", "--json", "--device", "cpu"])
    figures = json.loads(out.getvalue())
    assert code == 0 and figures["load_format"] == "dummy"
    assert {"peak_bytes", "final_bytes", "largest_layer_bytes", "naive_peak_bytes", "sqnr_db",
            "states", "quant", "seconds"} <= figures.keys()
    assert figures["states"]["FINALIZED"] > 0 and figures["quant"] == "fp8"
