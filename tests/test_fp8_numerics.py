"""FP8 weight quantization numerics: the torch reference path on CPU."""

import pytest
import torch

from loadfsm.quant import (FP8_DTYPE, Fp8Config, dequantize_fp8, fp8_scale_shape, fp8_scales,
                           quantize_fp8, quantize_fp8_into, resolve_quant, sqnr_db)
from loadfsm.quant import fp8 as fp8_module
from tiny_models import randn

GRANULARITIES = ["tensor", "channel", "block"]


def _config(granularity: str) -> Fp8Config:
    # Small tiles so ragged edges and several blocks appear in small weights.
    return Fp8Config(granularity=granularity, block_size=(16, 32))


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_sqnr_random_normal(granularity):
    """Dequantized random-normal weights stay >= 25 dB from the bf16 original."""
    config = _config(granularity)
    w = randn(72, 100)
    q, scale = quantize_fp8(w, config)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert sqnr_db(w, dequantize_fp8(q, scale, config)) >= 25.0


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
@pytest.mark.parametrize("shape", [(40, 70), (3, 40, 70)], ids=["2d", "3d"])
def test_scale_shapes(granularity, shape):
    """Scales have the documented shape, ragged blocks included."""
    config = _config(granularity)
    expected = {"tensor": shape[:-2], "channel": (*shape[:-1], 1),
                "block": (*shape[:-2], 3, 3)}[granularity]
    assert fp8_scales(randn(*shape), config).shape == torch.Size(expected)
    assert fp8_scale_shape(shape, config) == torch.Size(expected)


def test_channel_beats_tensor_on_uneven_rows():
    """Per-channel scales are no worse than per-tensor when row magnitudes differ widely."""
    w = (randn(64, 128).float() * torch.logspace(-4, 2, 64)[:, None]).to(torch.bfloat16)
    errors = {}
    for granularity in ("tensor", "channel"):
        config = _config(granularity)
        errors[granularity] = sqnr_db(w, dequantize_fp8(*quantize_fp8(w, config), config))
    assert errors["channel"] >= errors["tensor"]


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_zero_weight_gives_finite_scale_and_zero_q(granularity):
    """An all-zero weight gets a tiny positive scale and all-zero codes."""
    q, scale = quantize_fp8(torch.zeros(32, 64, dtype=torch.bfloat16), _config(granularity))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q.float() == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_non_finite_weight_gives_non_finite_scale(granularity, bad):
    """NaN or Inf anywhere in the weight shows up as a non-finite scale."""
    w = randn(32, 64)
    w[17, 40] = bad
    assert not torch.isfinite(fp8_scales(w, _config(granularity))).all()


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_quantize_into_writes_given_storage(granularity):
    """quantize_fp8_into fills the given tensors in place and matches quantize_fp8."""
    config = _config(granularity)
    w = randn(48, 80)
    q_out = torch.empty(w.shape, dtype=FP8_DTYPE)
    scale_out = torch.empty(fp8_scale_shape(w.shape, config))
    pointers = (q_out.data_ptr(), scale_out.data_ptr())
    quantize_fp8_into(w, q_out, scale_out, config)
    q, scale = quantize_fp8(w, config)
    assert (q_out.data_ptr(), scale_out.data_ptr()) == pointers
    assert torch.equal(q_out.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(scale_out, scale)


def test_quantize_into_rejects_wrong_outputs():
    """quantize_fp8_into raises ValueError for outputs of the wrong shape or dtype."""
    config = _config("channel")
    w = randn(8, 16)
    with pytest.raises(ValueError, match="scale_out"):
        quantize_fp8_into(w, torch.empty(8, 16, dtype=FP8_DTYPE), torch.empty(8), config)
    with pytest.raises(ValueError, match="q_out"):
        quantize_fp8_into(w, torch.empty(8, 16), torch.empty(8, 1), config)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_chunked_equals_unchunked(granularity, monkeypatch):
    """Quantizing in tiny row chunks gives bit-identical codes and scales."""
    config = _config(granularity)
    w = randn(2, 45, 70)
    q_full, scale_full = quantize_fp8(w, config)
    monkeypatch.setattr(fp8_module, "_CHUNK_BYTES", 3 * 70 * 4)  # 3 rows per chunk
    q_chunked, scale_chunked = quantize_fp8(w, config)
    assert torch.equal(q_chunked.view(torch.uint8), q_full.view(torch.uint8))
    assert torch.equal(scale_chunked, scale_full)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_stacked_experts_scale_per_expert(granularity):
    """A 3-D [E, N, K] weight quantizes exactly like each expert on its own."""
    config = _config(granularity)
    w = randn(3, 40, 70)
    w[1] *= 50  # experts of different magnitude must not share a scale
    q, scale = quantize_fp8(w, config)
    for e in range(3):
        q_e, scale_e = quantize_fp8(w[e].contiguous(), config)
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8))
        assert torch.equal(scale[e], scale_e)


def test_multiplies_by_reciprocal():
    """Codes equal clamp(w * (1/scale)) cast to e4m3fn, the formula kernels reproduce."""
    config = _config("tensor")
    w = randn(16, 32)
    q, scale = quantize_fp8(w, config)
    expected = (w.float() * scale.reciprocal()).clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_sqnr_db_identical_is_infinite():
    """sqnr_db of a tensor against itself is +inf; a 10% error gives 20 dB."""
    x = randn(8, 8).float()
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("name, granularity", [
    ("fp8", "tensor"), ("FP8", "tensor"), ("fp8-channel", "channel"),
    ("fp8_channel", "channel"), ("fp8-block", "block"), ("fp8_block", "block"),
], ids=lambda v: str(v))
def test_resolve_quant_names(name, granularity):
    """Each accepted quant name maps to its granularity."""
    assert resolve_quant(name) == Fp8Config(granularity=granularity)


@pytest.mark.parametrize("name", [None, "none", "bf16"], ids=["None", "none", "bf16"])
def test_resolve_quant_none(name):
    """None, "none" and "bf16" mean no quantization."""
    assert resolve_quant(name) is None


def test_resolve_quant_passes_config_through():
    """An Fp8Config passes through resolve_quant unchanged."""
    config = Fp8Config(granularity="block", block_size=(64, 64))
    assert resolve_quant(config) is config


def test_resolve_quant_unknown_lists_names():
    """An unknown name raises ValueError listing the accepted names."""
    with pytest.raises(ValueError, match="fp8-channel"):
        resolve_quant("int4")


@pytest.mark.parametrize("kwargs", [
    {"granularity": "row"}, {"block_size": (128,)}, {"block_size": (0, 128)},
    {"block_size": (128.0, 128)}, {"exclude": "lm_head"}, {"exclude": ("lm_head", 3)},
], ids=["granularity", "block-len", "block-zero", "block-float", "exclude-str",
        "exclude-int"])
def test_config_validation(kwargs):
    """Invalid config fields raise ValueError."""
    with pytest.raises(ValueError):
        Fp8Config(**kwargs)


@pytest.mark.parametrize("name, excluded", [
    ("lm_head", True), ("model.lm_head", True), ("model.lm_head_norm", False),
    ("model.layers.0.mlp.gate", True), ("model.layers.0.mlp.down_proj", False),
], ids=lambda v: str(v))
def test_config_excludes(name, excluded):
    """exclude matches fnmatch patterns and plain dotted suffixes."""
    config = Fp8Config(exclude=["lm_head", "*.mlp.gate"])
    assert config.excludes(name) is excluded
