"""The 128x128 block FP8 forward on CPU: the operands laid out for F.scaled_mm's block recipe
(checked by emulating cuBLASLt in float64), the kernel choice and the fallback."""

import pytest
import torch
import torch.nn.functional as F

from loadfsm.quant import (FP8_DTYPE, Fp8Config, Fp8Linear, Fp8StackedExperts, quantize_fp8,
                           quantize_fp8_reference, sqnr_db)
from loadfsm.quant import linear as linear_module
from loadfsm.quant.fp8_block_mm import (block_scaled_mm, block_scaled_mm_fits,
                                        block_scaled_mm_runs, quantize_activation_groups,
                                        weight_scale_operand)
from loadfsm.quant.linear import dequantized_matmul, fp8_kernel
from checks import emulate_block_scaled_mm, graded
from tiny_models import randn

BLOCK = Fp8Config(granularity="block", block_size=(128, 128))


def _checked_scaled_mm(a, b, scale_a, recipe_a, scale_b, recipe_b, *, output_dtype):
    """F.scaled_mm's 1x128 x 128x128 recipe as torch checks its operands (ScaledBlas.cpp,
    plus cuBLASLt's token count a multiple of 4) and as cuBLASLt computes it."""
    m, k = a.shape
    n, groups = b.shape[1], -(-k // 128)
    padded_groups = -(-groups // 4) * 4
    assert (recipe_a, recipe_b) == (F.ScalingType.BlockWise1x128,
                                    F.ScalingType.BlockWise128x128)
    assert a.dtype == b.dtype == FP8_DTYPE and m % 4 == 0 and b.stride() == (1, k)
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert scale_a.shape == (m, groups) and scale_a.stride() == (1, m)
    assert scale_b.shape == (padded_groups, n // 128)
    assert scale_b.stride() == (1, padded_groups)
    return emulate_block_scaled_mm(a, scale_a, b.t(), scale_b, m).to(output_dtype)


@pytest.mark.parametrize("m", [1, 3, 4, 130], ids=lambda m: f"M{m}")
def test_activation_operand_layout(m):
    """Activations come out as [Mp, K] fp8 and [Mp, K/128] float32 scales with strides
    (1, Mp), Mp = M rounded up to 4."""
    a, scale_a = quantize_activation_groups(randn(m, 384))
    padded = -(-m // 4) * 4
    assert a.dtype == FP8_DTYPE and a.shape == (padded, 384)
    assert scale_a.dtype == torch.float32 and scale_a.shape == (padded, 3)
    assert scale_a.stride() == (1, padded)


def test_activation_groups_are_rows_of_128():
    """Each token's 128-column group gets exactly the per-row quantization of that group."""
    x = randn(6, 512) * torch.logspace(-2, 2, 512)[None, :].bfloat16()
    a, scale_a = quantize_activation_groups(x)
    q_ref, s_ref = quantize_fp8_reference(x.view(-1, 128), Fp8Config(granularity="channel"))
    assert torch.equal(a[:6].view(torch.uint8), q_ref.view(6, 512).view(torch.uint8))
    assert torch.equal(scale_a[:6], s_ref.view(6, 4))


def test_weight_scale_operand_is_a_view():
    """With K/128 a multiple of 4, scale_b is the transposed view of the tile scales."""
    _, scale = quantize_fp8(randn(384, 512), BLOCK)                     # [3, 4]
    operand = weight_scale_operand(scale)
    assert operand.shape == (4, 3) and operand.stride() == (1, 4)
    assert operand.data_ptr() == scale.data_ptr()


def test_weight_scale_operand_pads_k_blocks():
    """With K/128 not a multiple of 4, scale_b is [round_up(K/128, 4), N/128], strides
    (1, round_up), its first K/128 rows the transposed tile scales."""
    _, scale = quantize_fp8(randn(256, 640), BLOCK)                     # [2, 5]
    operand = weight_scale_operand(scale)
    assert operand.shape == (8, 2) and operand.stride() == (1, 8)
    assert torch.equal(operand[:5], scale.t())


@pytest.mark.parametrize("m, k, n", [(64, 512, 384), (5, 640, 256), (130, 1024, 128)],
                         ids=["aligned", "ragged-k-blocks", "ragged-m"])
def test_emulated_block_mm_matches_float(m, k, n):
    """The operands, read the way cuBLASLt reads them, give x @ w.T within 25 dB."""
    x, w = graded(m, k, seed=1), graded(n, k, seed=2)
    q, scale = quantize_fp8(w, BLOCK)
    a, scale_a = quantize_activation_groups(x)
    out = emulate_block_scaled_mm(a, scale_a, q, weight_scale_operand(scale), m)
    assert sqnr_db(x.double() @ w.double().t(), out) >= 25.0


def test_emulated_block_mm_matches_fallback():
    """Quantizing the activations in 1x128 groups costs little: the emulated block GEMM
    stays >= 28 dB from the dequantize + F.linear fallback."""
    x, w = graded(64, 1024, seed=1), graded(256, 1024, seed=2)
    q, scale = quantize_fp8(w, BLOCK)
    a, scale_a = quantize_activation_groups(x)
    out = emulate_block_scaled_mm(a, scale_a, q, weight_scale_operand(scale), 64)
    assert sqnr_db(dequantized_matmul(x, q, scale, None, BLOCK, torch.bfloat16), out) >= 28.0


@pytest.mark.parametrize("m, k, n", [(5, 640, 256), (8, 512, 384)], ids=["padded", "aligned"])
def test_block_scaled_mm_passes_torch_checks(monkeypatch, m, k, n):
    """Fp8Linear on the block kernel hands F.scaled_mm operands its checks accept, and
    returns M rows with the bias added (>= 25 dB from F.linear)."""
    monkeypatch.setattr(F, "scaled_mm", _checked_scaled_mm)
    monkeypatch.setattr(linear_module, "block_scaled_mm_runs", lambda device: True)
    w, bias, x = graded(n, k, seed=1), randn(n, seed=2), graded(m, k, seed=3)
    layer = Fp8Linear.from_quantized(*quantize_fp8(w, BLOCK), bias, BLOCK)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert sqnr_db(F.linear(x, w, bias), out) >= 25.0


@pytest.mark.parametrize("n, k, config, out_dtype, fits", [
    (256, 512, BLOCK, torch.bfloat16, True),
    (200, 512, BLOCK, torch.bfloat16, False),
    (256, 500, BLOCK, torch.bfloat16, False),
    (256, 512, Fp8Config(granularity="block", block_size=(64, 128)), torch.bfloat16, False),
    (256, 512, Fp8Config(granularity="channel"), torch.bfloat16, False),
    (256, 512, BLOCK, torch.float16, False),
], ids=["fits", "n-ragged", "k-ragged", "block-64", "channel", "fp16-out"])
def test_block_scaled_mm_fits(n, k, config, out_dtype, fits):
    """The recipe takes 128x128 tiles, N and K multiples of 128 and a bf16 output only."""
    assert block_scaled_mm_fits(torch.empty(n, k, dtype=FP8_DTYPE), config, out_dtype) is fits


def test_block_scaled_mm_fits_needs_row_major_weight():
    """A transposed weight view does not fit (its .t() would not be column-major)."""
    q = torch.empty(512, 256, dtype=FP8_DTYPE).t()
    assert not block_scaled_mm_fits(q, BLOCK, torch.bfloat16)


def test_block_scaled_mm_does_not_run_on_cpu():
    """block_scaled_mm_runs says no for a CPU device."""
    assert not block_scaled_mm_runs(torch.device("cpu"))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_kernel_on_cpu_is_the_fallback(granularity):
    """On CPU every granularity runs dequantize + F.linear."""
    config = Fp8Config(granularity=granularity)
    q = torch.empty(256, 512, dtype=FP8_DTYPE)
    assert fp8_kernel(randn(8, 512), q, config, torch.bfloat16) is dequantized_matmul


@pytest.mark.parametrize("m, n, k, config, expected", [
    (8, 256, 512, BLOCK, block_scaled_mm),
    (0, 256, 512, BLOCK, dequantized_matmul),
    (8, 200, 512, BLOCK, dequantized_matmul),
    (8, 256, 512, Fp8Config(granularity="block", block_size=(32, 32)), dequantized_matmul),
], ids=["fits", "no-tokens", "n-ragged", "block-32"])
def test_kernel_where_the_device_runs_blocks(monkeypatch, m, n, k, config, expected):
    """Where the device runs the block recipe, block weights that fit take it; the rest
    fall back."""
    monkeypatch.setattr(linear_module, "block_scaled_mm_runs", lambda device: True)
    q = torch.empty(n, k, dtype=FP8_DTYPE)
    assert fp8_kernel(randn(m, k), q, config, torch.bfloat16) is expected


def test_stacked_experts_share_the_block_kernel(monkeypatch):
    """An expert's slice of Fp8StackedExperts is chosen for the block recipe like a linear."""
    monkeypatch.setattr(linear_module, "block_scaled_mm_runs", lambda device: True)
    experts = Fp8StackedExperts(2, 256, 128, BLOCK, device="meta")
    for name in ("gate_up_proj", "down_proj"):
        q = getattr(experts, name)[1]
        assert fp8_kernel(torch.empty(4, q.shape[1], device="meta"), q, BLOCK,
                          experts.out_dtype) is block_scaled_mm


def test_block_128_fallback_matches_bf16():
    """On CPU a 128x128-block Fp8Linear with ragged edges stays >= 25 dB from F.linear."""
    w, bias, x = randn(200, 300), randn(200, seed=1), randn(9, 300, seed=2)
    layer = Fp8Linear.from_quantized(*quantize_fp8(w, BLOCK), bias, BLOCK)
    assert sqnr_db(F.linear(x, w, bias), layer(x)) >= 25.0
