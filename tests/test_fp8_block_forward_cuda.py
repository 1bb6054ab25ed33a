"""The 128x128 block FP8 forward on an sm90 GPU: F.scaled_mm's block recipe taken, against
bf16 on Llama-8B's shapes, against an emulation of its own operands on ragged shapes, in
stacked experts and in a CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

from loadfsm.quant import (Fp8Config, Fp8Linear, Fp8StackedExperts,
                           quantize_fp8, quantize_fp8_reference, sqnr_db)
from loadfsm.quant.fp8_block_mm import (block_scaled_mm, block_scaled_mm_runs,
                                        quantize_activation_groups, weight_scale_operand)
from loadfsm.quant.linear import fp8_kernel
from checks import captured, emulate_block_scaled_mm, experts_reference, graded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCK = Fp8Config(granularity="block", block_size=(128, 128))
# (in_features, out_features) of one Llama-8B decoder layer's GEMMs.
LLAMA_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
            "down": (14336, 4096)}


@pytest.fixture(autouse=True)
def _block_recipe():
    """Skip off sm90 or on a torch build without cuBLASLt block scaling; on one that has
    both, the kernel choice must find the recipe running."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("F.scaled_mm's 1x128 x 128x128 recipe runs on sm90 only")
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if not hasattr(F, "scaled_mm") or cuda < (12, 9):
        pytest.skip("needs torch >= 2.10 built for CUDA >= 12.9 (cuBLASLt block scaling)")
    assert block_scaled_mm_runs(torch.device("cuda"))


def _layer(k: int, n: int, bias: bool = False, seed: int = 0):
    gen = torch.Generator("cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    b = torch.randn(n, device="cuda", generator=gen).bfloat16() if bias else None
    return Fp8Linear.from_quantized(*quantize_fp8(w, BLOCK), b, BLOCK), w


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=gen).bfloat16()


@pytest.mark.parametrize("tokens", [2048, 8192])
@pytest.mark.parametrize("shape", LLAMA_8B.values(), ids=list(LLAMA_8B))
def test_llama_shapes_take_block_mm_and_match_bf16(shape, tokens):
    """On Llama-8B's shapes Fp8Linear runs F.scaled_mm's block recipe and stays >= 25 dB
    from bf16 F.linear on the original weight."""
    layer, w = _layer(*shape)
    x = _x(tokens, shape[0])
    assert fp8_kernel(x, layer.weight, layer.config, layer.out_dtype) is block_scaled_mm
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, shape[1])
    assert sqnr_db(F.linear(x, w), out) >= 25.0


@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (3, 640, 384), (17, 14336, 256),
                                     (130, 512, 128), (2048, 4096, 6144)],
                         ids=["M1", "M3-ragged-k-blocks", "M17", "M130", "M2048"])
def test_block_mm_matches_emulation_of_its_operands(m, k, n):
    """The GEMM equals, to its bf16 output's rounding (>= 40 dB), cuBLASLt's documented
    math on the operands it was given: a scale read from the wrong tile drops it below
    20 dB. Covers token counts not a multiple of 4 and K/128 not a multiple of 4."""
    x, w = graded(m, k, seed=1, device="cuda"), graded(n, k, seed=2, device="cuda")
    q, scale = quantize_fp8(w, BLOCK)
    out = block_scaled_mm(x, q, scale, None, BLOCK, torch.bfloat16)
    a, scale_a = quantize_activation_groups(x)
    assert out.shape == (m, n)
    assert sqnr_db(emulate_block_scaled_mm(a, scale_a, q, weight_scale_operand(scale), m),
                   out) >= 40.0
    assert sqnr_db(x.double() @ w.double().t(), out) >= 25.0


@pytest.mark.parametrize("m", [1, 37, 64, 2051], ids=lambda m: f"M{m}")
def test_activation_groups_match_reference_on_cuda(m):
    """The CUDA activation quantization (one Triton launch where available) gives the
    reference codes and scales bit for bit, whatever M's remainder by its row block, also
    for a non-contiguous input."""
    x = graded(m, 1024, seed=3, device="cuda")
    wide = torch.empty(m, 2048, dtype=x.dtype, device="cuda")
    wide[:, ::2] = x
    q_ref, s_ref = quantize_fp8_reference(x.view(-1, 128), Fp8Config(granularity="channel"))
    for given in (x, wide[:, ::2]):
        a, scale_a = quantize_activation_groups(given)
        assert torch.equal(a[:m].view(torch.uint8), q_ref.view(m, 1024).view(torch.uint8))
        assert torch.equal(scale_a[:m], s_ref.view(m, 8))


def test_bias_and_leading_dims():
    """[B, S, K] inputs with a bias give [B, S, N] equal to the flattened rows' forward."""
    layer, w = _layer(512, 384, bias=True)
    x = _x(6, 512).view(2, 3, 512)
    out = layer(x)
    assert out.shape == (2, 3, 384)
    assert torch.equal(out, layer(x.reshape(6, 512)).view(2, 3, 384))
    assert sqnr_db(F.linear(x, w, layer.bias), out) >= 25.0


def test_stacked_experts_take_block_mm():
    """Fp8StackedExperts with 128x128 tiles run each expert through the block recipe and
    agree with their own dequantized weights >= 25 dB."""
    gen = torch.Generator("cuda").manual_seed(4)
    gate_up = (torch.randn(4, 512, 256, device="cuda", generator=gen) * 0.02).bfloat16()
    down = (torch.randn(4, 256, 256, device="cuda", generator=gen) * 0.02).bfloat16()
    experts = Fp8StackedExperts.from_quantized(*quantize_fp8(gate_up, BLOCK),
                                               *quantize_fp8(down, BLOCK), BLOCK)
    x = _x(64, 256, seed=5)
    assert fp8_kernel(x, experts.gate_up_proj[2], BLOCK, experts.out_dtype) is block_scaled_mm
    topk_ids = torch.arange(64, device="cuda")[:, None] % 4
    topk_weights = torch.ones(64, 1, dtype=torch.bfloat16, device="cuda")
    out = experts(x, topk_ids, topk_weights)
    ref = experts_reference(experts, x, topk_ids, BLOCK)
    assert sqnr_db(ref, out) >= 25.0


@pytest.mark.parametrize("tokens", [8, 6], ids=["M8", "M6-padded"])
def test_cuda_graph_capture(tokens):
    """The block forward captures into a CUDA graph that replays on new inputs, and a
    weight push written in place reaches the replay (no derived copy of the scales).
    Replay and eager agree to the bf16 output's rounding (>= 40 dB; cuBLASLt need not
    pick the same algorithm on the capture stream); stale inputs would be far off."""
    layer, _ = _layer(640, 384, bias=True)
    static_x = _x(tokens, 640, seed=2)
    graph, static_out = captured(layer, static_x)
    new_x = _x(tokens, 640, seed=3)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert sqnr_db(layer(new_x), static_out) >= 40.0
    pushed, _ = _layer(640, 384, bias=True, seed=9)
    layer.weight.data.copy_(pushed.weight)
    layer.weight_scale.data.copy_(pushed.weight_scale * 4)  # a stale scale would show
    graph.replay()
    torch.cuda.synchronize()
    assert sqnr_db(layer(new_x), static_out) >= 40.0
