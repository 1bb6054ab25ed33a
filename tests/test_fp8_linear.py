"""Fp8Linear and Fp8StackedExperts against their bf16 counterparts (fallback path, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from loadfsm.quant import (FP8_DTYPE, Fp8Config, Fp8Linear, Fp8StackedExperts, quantize_fp8,
                           sqnr_db)
from loadfsm.quant.experts import StackedExperts
from tiny_models import randn

GRANULARITIES = ["tensor", "channel", "block"]


def _config(granularity: str) -> Fp8Config:
    return Fp8Config(granularity=granularity, block_size=(32, 32))


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_linear_matches_bf16(granularity):
    """Fp8Linear's output stays >= 25 dB from bf16 F.linear on the original weight."""
    config = _config(granularity)
    w, bias, x = randn(96, 64), randn(96, seed=1), randn(8, 64, seed=2)
    layer = Fp8Linear.from_quantized(*quantize_fp8(w, config), bias, config)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 96)
    assert sqnr_db(F.linear(x, w, bias), out) >= 25.0


def test_linear_leading_dims():
    """Inputs [B, S, K] give [B, S, N] equal to running the flattened rows."""
    config = _config("channel")
    layer = Fp8Linear.from_quantized(*quantize_fp8(randn(48, 32), config), None, config)
    x = randn(2, 5, 32, seed=3)
    out = layer(x)
    assert out.shape == (2, 5, 48)
    assert torch.equal(out, layer(x.reshape(10, 32)).reshape(2, 5, 48))


def test_from_quantized_shares_storage():
    """from_quantized wraps the given tensors without copying them."""
    config = _config("block")
    q, scale = quantize_fp8(randn(64, 64), config)
    bias = randn(64)
    layer = Fp8Linear.from_quantized(q, scale, bias, config)
    assert layer.weight.data_ptr() == q.data_ptr()
    assert layer.weight_scale.data_ptr() == scale.data_ptr()
    assert layer.bias.data_ptr() == bias.data_ptr()


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_linear_constructor_allocates_fp8(granularity):
    """The constructor allocates fp8 weights and float32 scales, none needing grad."""
    layer = Fp8Linear(64, 96, True, _config(granularity), device="meta")
    assert layer.weight.dtype == FP8_DTYPE and layer.weight.shape == (96, 64)
    assert layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in layer.parameters())
    assert f"granularity={granularity}" in repr(layer)


def test_linear_without_bias_registers_none():
    """bias=False leaves a registered, empty bias slot (like nn.Linear)."""
    layer = Fp8Linear(16, 16, False, _config("tensor"))
    assert layer.bias is None and "bias" not in dict(layer.named_parameters())


def test_from_quantized_rejects_wrong_scale():
    """from_quantized raises ValueError when the scale shape does not fit the config."""
    q, scale = quantize_fp8(randn(32, 32), _config("tensor"))
    with pytest.raises(ValueError, match="scale"):
        Fp8Linear.from_quantized(q, scale, None, _config("channel"))


def _route(tokens: int, experts: int, k: int = 2):
    gen = torch.Generator().manual_seed(7)
    topk_ids = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices
    topk_weights = torch.rand(tokens, k, generator=gen).softmax(-1).to(torch.bfloat16)
    return topk_ids, topk_weights


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_stacked_experts_match_bf16(granularity):
    """Fp8StackedExperts' output stays >= 25 dB from bf16 StackedExperts."""
    config = _config(granularity)
    ref = StackedExperts(4, 64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref.gate_up_proj.copy_(randn(4, 64, 64, seed=1))
        ref.down_proj.copy_(randn(4, 64, 32, seed=2))
    fp8 = Fp8StackedExperts.from_quantized(*quantize_fp8(ref.gate_up_proj.detach(), config),
                                           *quantize_fp8(ref.down_proj.detach(), config),
                                           config)
    x = randn(12, 64, seed=3)
    with torch.no_grad():
        expected = ref(x, *_route(12, 4))
    assert sqnr_db(expected, fp8(x, *_route(12, 4))) >= 25.0


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_stacked_experts_constructor_allocates_fp8(granularity):
    """The constructor allocates only fp8 weights and float32 per-expert scales."""
    experts = Fp8StackedExperts(4, 64, 32, _config(granularity), device="meta")
    dtypes = {name: p.dtype for name, p in experts.named_parameters()}
    assert dtypes == {"gate_up_proj": FP8_DTYPE, "gate_up_proj_scale": torch.float32,
                      "down_proj": FP8_DTYPE, "down_proj_scale": torch.float32}
    assert experts.gate_up_proj_scale.shape[0] == 4


def test_stacked_experts_from_quantized_shares_storage():
    """Fp8StackedExperts.from_quantized wraps the given tensors without copying."""
    config = _config("channel")
    gate_up, gate_up_scale = quantize_fp8(randn(2, 32, 16), config)
    down, down_scale = quantize_fp8(randn(2, 16, 16), config)
    experts = Fp8StackedExperts.from_quantized(gate_up, gate_up_scale, down, down_scale, config)
    assert experts.gate_up_proj.data_ptr() == gate_up.data_ptr()
    assert experts.down_proj_scale.data_ptr() == down_scale.data_ptr()
    assert (experts.num_experts, experts.hidden, experts.intermediate) == (2, 16, 16)


def test_stacked_experts_reject_mismatched_shapes():
    """from_quantized raises ValueError when gate_up and down describe different experts."""
    config = _config("tensor")
    with pytest.raises(ValueError, match="same experts"):
        Fp8StackedExperts.from_quantized(*quantize_fp8(randn(2, 32, 16), config),
                                         *quantize_fp8(randn(2, 16, 8), config), config)
