"""FP8 on CUDA: Triton kernels vs the torch reference, _scaled_mm vs fallback, graph capture."""

from functools import partial

import pytest
import torch

from loadfsm.quant import (FP8_DTYPE, Fp8Config, Fp8Linear, Fp8StackedExperts,
                           fp8_matmul, quantize_fp8, quantize_fp8_into, quantize_fp8_reference,
                           sqnr_db, triton_available)
from loadfsm.quant import linear as linear_module
from checks import captured, experts_reference
from tiny_models import randn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GRANULARITIES = ["tensor", "channel", "block"]
# Ragged shapes, a stacked-experts shape and rows long enough for the two-pass channel kernel.
SHAPES = [(256, 512), (200, 300), (3, 96, 160), (8, 40000)]


def _config(granularity: str) -> Fp8Config:
    return Fp8Config(granularity=granularity, block_size=(128, 128))


_randn = partial(randn, device="cuda")


def _requires_fp8_mm():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9 for _scaled_mm")


@pytest.mark.skipif(not triton_available("cuda"), reason="needs Triton")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_triton_bit_identical_to_reference(granularity, shape):
    """The Triton kernels produce exactly the reference codes and scales."""
    config = _config(granularity)
    w = _randn(*shape) * torch.logspace(-3, 3, shape[-2], device="cuda")[:, None].bfloat16()
    q, scale = quantize_fp8(w, config)
    q_ref, scale_ref = quantize_fp8_reference(w, config)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.skipif(not triton_available("cuda"), reason="needs Triton")
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_triton_non_finite_scale(granularity):
    """The Triton kernels turn NaN and Inf in the weight into non-finite scales."""
    for bad in (float("nan"), float("inf")):
        w = _randn(256, 512)
        w[100, 300] = bad
        _, scale = quantize_fp8(w, _config(granularity))
        assert not torch.isfinite(scale).all()


@pytest.mark.skipif(not triton_available("cuda"), reason="needs Triton")
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_triton_zero_weight(granularity):
    """An all-zero weight on the Triton path gets a finite positive scale and zero codes."""
    q, scale = quantize_fp8(torch.zeros(128, 256, dtype=torch.bfloat16, device="cuda"),
                            _config(granularity))
    assert torch.isfinite(scale).all() and (scale > 0).all() and (q.float() == 0).all()


@pytest.mark.skipif(not triton_available("cuda"), reason="needs Triton")
def test_triton_into_keeps_addresses():
    """quantize_fp8_into on CUDA writes into the given storage."""
    config = _config("channel")
    w = _randn(256, 512)
    q_out = torch.empty(w.shape, dtype=FP8_DTYPE, device="cuda")
    scale_out = torch.empty(256, 1, device="cuda")
    pointers = (q_out.data_ptr(), scale_out.data_ptr())
    quantize_fp8_into(w, q_out, scale_out, config)
    assert (q_out.data_ptr(), scale_out.data_ptr()) == pointers
    assert torch.equal(q_out.view(torch.uint8),
                       quantize_fp8_reference(w, config)[0].view(torch.uint8))


@pytest.mark.parametrize("granularity", ["tensor", "channel"], ids=["tensor", "channel"])
def test_scaled_mm_matches_fallback(granularity, monkeypatch):
    """The _scaled_mm path stays >= 30 dB from the dequantize + F.linear fallback."""
    _requires_fp8_mm()
    config = _config(granularity)
    q, scale = quantize_fp8(_randn(256, 512), config)
    bias, x = _randn(256, seed=1), _randn(3, 7, 512, seed=2)
    fast = fp8_matmul(x, q, scale, bias, config, torch.bfloat16)
    monkeypatch.setattr(linear_module, "fp8_kernel",
                        lambda *args: linear_module.dequantized_matmul)
    slow = fp8_matmul(x, q, scale, bias, config, torch.bfloat16)
    assert fast.shape == slow.shape == (3, 7, 256)
    assert sqnr_db(slow, fast) >= 30.0


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=GRANULARITIES)
def test_linear_cuda_matches_bf16(granularity):
    """Fp8Linear on CUDA stays >= 25 dB from bf16 F.linear."""
    config = _config(granularity)
    w, x = _randn(256, 512), _randn(16, 512, seed=1)
    layer = Fp8Linear.from_quantized(*quantize_fp8(w, config), None, config)
    assert sqnr_db(x @ w.t(), layer(x)) >= 25.0


@pytest.mark.parametrize("granularity", ["tensor", "channel"], ids=["tensor", "channel"])
def test_cuda_graph_capture(granularity):
    """Fp8Linear's forward captures into a CUDA graph that replays on new inputs."""
    _requires_fp8_mm()
    config = _config(granularity)
    layer = Fp8Linear.from_quantized(*quantize_fp8(_randn(256, 512), config),
                                     _randn(256, seed=1), config)
    static_x = _randn(8, 512, seed=2)
    graph, static_out = captured(layer, static_x)
    new_x = _randn(8, 512, seed=3)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, layer(new_x))


def test_stacked_experts_cuda():
    """Fp8StackedExperts on CUDA agrees with its own dequantized weights >= 25 dB."""
    config = _config("channel")
    gate_up, down = _randn(4, 256, 128), _randn(4, 128, 128, seed=1)
    experts = Fp8StackedExperts.from_quantized(*quantize_fp8(gate_up, config),
                                               *quantize_fp8(down, config), config)
    x = _randn(32, 128, seed=2)
    topk_ids = torch.arange(32, device="cuda")[:, None] % 4
    topk_weights = torch.ones(32, 1, dtype=torch.bfloat16, device="cuda")
    out = experts(x, topk_ids, topk_weights)
    ref = experts_reference(experts, x, topk_ids, config)
    assert sqnr_db(ref, out) >= 25.0


@pytest.mark.parametrize("shape", [(1, 256), (37, 4096), (130, 14336), (5, 40000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_token_scales_match_reference(shape):
    """The row-wise forward's activations (one Triton launch, no checks) equal the per-row
    reference bit for bit, for one-pass and two-pass rows."""
    x = randn(*shape).cuda() * torch.logspace(-3, 2, shape[1], device="cuda").bfloat16()
    q_ref, s_ref = quantize_fp8_reference(x, Fp8Config(granularity="channel"))
    xq, x_scale = linear_module._quantize_tokens(x)
    assert torch.equal(xq.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(x_scale, s_ref)
