"""A scheme that leaves layers another scheme would quantize in full precision says so
(a warning naming them) instead of reporting a quantized model silently."""

import pytest
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import build_model, reference_state_dict
from tiny_models import SMALL, hook_load


def _warnings(logs):
    return [e for e in logs if e["event"] == "layers_left_unquantized"]


def test_engine_linears_under_int8_are_named():
    """Engine modules run FP8 only: under INT8 they load in bf16, and the load says so."""
    with capture_logs() as logs:
        hook_load(SMALL, reference_state_dict(SMALL).items(), quant="int8")
    (warning,) = _warnings(logs)
    assert warning["quant"] == "int8" and warning["quantized_by"] == ["Fp8Config"]
    assert any(name.endswith("qkv_proj") for name in warning["layers"])


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-channel", "int8"])
def test_a_scheme_that_covers_every_layer_says_nothing(quant):
    model = build_model("tiny")
    with capture_logs() as logs:
        loadfsm.load(model, reference_state_dict("tiny").items(), quant=quant, device="cpu")
    assert _warnings(logs) == []


@pytest.mark.parametrize("layout", ["deepseek", "compressed-tensors", "modelopt"])
def test_a_pre_quantized_checkpoint_says_nothing(tmp_path, layout):
    """Layers a checkpoint stores in bf16 (its head, embeddings) are its own choice."""
    from loadfsm.testing.fp8_checkpoint import quantize_state, write_fp8_checkpoint
    tensors = quantize_state(reference_state_dict(SMALL), layout)
    path = write_fp8_checkpoint(tensors, tmp_path / layout, layout=layout)
    with capture_logs() as logs:
        loadfsm.load(build_model(SMALL), path, device="cpu")
    assert _warnings(logs) == []
