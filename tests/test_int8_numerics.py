"""INT8 weight-only numerics on CPU: the per-row quantization, its config, and the matmul
paths of Int8Linear / Int8StackedExperts (``torch._weight_int8pack_mm`` and the fallback)."""

import pytest
import torch
import torch.nn.functional as F

import loadfsm
from loadfsm.quant import (Fp8Config, Int8Config, Int8Linear, Int8StackedExperts,
                           dequantize_int8, int8_matmul, quantize_int8, resolve_quant, sqnr_db)
from loadfsm.quant import int8 as int8_module
from loadfsm.quant.config import quant_name
from loadfsm.quant.experts import StackedExperts
from loadfsm.quant.int8 import int8_scale_shape, quantize_int8_into, use_int8pack_mm

CPU_KERNEL = int8_module._has_int8pack_mm()
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _randn(*shape, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_sqnr_random_normal(dtype):
    """Dequantized random-normal weights stay >= 38 dB from the original."""
    w = _randn(96, 256, dtype=dtype)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (96, 1)
    assert sqnr_db(w, dequantize_int8(q, scale, dtype)) >= 38.0


@pytest.mark.parametrize("shape", [(40, 70), (3, 40, 70)], ids=["2d", "3d"])
def test_scale_shape(shape):
    """One scale per output row (per expert for stacked weights)."""
    assert quantize_int8(_randn(*shape))[1].shape == (*shape[:-1], 1)
    assert int8_scale_shape(shape) == (*shape[:-1], 1)
    with pytest.raises(ValueError):
        int8_scale_shape((8,))


def test_codes_follow_the_documented_formula():
    """q = clamp(round(w / scale), -127, 127) with the stored scale; each row's largest
    magnitude maps to +-127 or next to it (the scale is rounded to bf16)."""
    w = _randn(32, 64)
    q, scale = quantize_int8(w)
    expected = (w.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
    assert torch.equal(q, expected)
    assert q.abs().amax(dim=1).min() >= 126


def test_uneven_rows_each_get_their_own_scale():
    """Rows six orders of magnitude apart keep >= 38 dB each: scales are per channel."""
    w = (_randn(64, 128).float() * torch.logspace(-4, 2, 64)[:, None]).to(torch.bfloat16)
    deq = dequantize_int8(*quantize_int8(w))
    assert min(sqnr_db(w[r], deq[r]) for r in range(64)) >= 38.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_rows_give_finite_scales_and_zero_codes(dtype):
    """An all-zero weight gets tiny positive scales and zero codes, never NaN."""
    q, scale = quantize_int8(torch.zeros(8, 32, dtype=dtype))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_reaches_its_row_scale(bad):
    """NaN or Inf in a row makes that row's scale non-finite, and no other."""
    w = _randn(16, 32)
    w[5, 7] = bad
    finite = torch.isfinite(quantize_int8(w)[1]).reshape(-1)
    assert not finite[5] and finite.sum() == 15


def test_stacked_experts_quantize_per_expert():
    """A 3-D [E, N, K] weight quantizes exactly like each expert on its own."""
    w = _randn(3, 40, 64)
    w[1] *= 50
    q, scale = quantize_int8(w)
    for e in range(3):
        q_e, scale_e = quantize_int8(w[e].contiguous())
        assert torch.equal(q[e], q_e) and torch.equal(scale[e], scale_e)


def test_chunked_equals_unchunked(monkeypatch):
    """Quantizing in tiny row chunks gives identical codes and scales."""
    w = _randn(2, 45, 70)
    q_full, scale_full = quantize_int8(w)
    monkeypatch.setattr(int8_module, "_CHUNK_BYTES", 3 * 70 * 4)     # 3 rows per chunk
    q_chunked, scale_chunked = quantize_int8(w)
    assert torch.equal(q_chunked, q_full) and torch.equal(scale_chunked, scale_full)


@pytest.mark.parametrize("q_out, scale_out, match", [
    (torch.empty(8, 16), torch.empty(8, 1, dtype=torch.bfloat16), "q_out"),
    (torch.empty(8, 16, dtype=torch.int8), torch.empty(8, 1), "scale_out"),
    (torch.empty(8, 16, dtype=torch.int8), torch.empty(8, dtype=torch.bfloat16), "scale_out"),
], ids=["q-dtype", "scale-dtype", "scale-shape"])
def test_quantize_into_rejects_wrong_outputs(q_out, scale_out, match):
    """quantize_int8_into names the output that does not fit."""
    with pytest.raises(ValueError, match=match):
        quantize_int8_into(_randn(8, 16), q_out, scale_out)


def test_integer_weights_are_refused():
    with pytest.raises(ValueError, match="int8"):
        quantize_int8(torch.ones(4, 4, dtype=torch.int32))


# -- config ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "INT8"])
def test_resolve_quant_int8(name):
    """"int8" names the default Int8Config; the report calls it "int8"."""
    assert resolve_quant(name) == Int8Config()
    assert quant_name(resolve_quant(name)) == "int8"


def test_config_objects_pass_through_resolve_quant():
    """Any config object (one with ``excludes``) is used as given, a user's too."""
    class UserConfig:
        def excludes(self, name):
            return False

    for config in (Int8Config(exclude=["lm_head"]), UserConfig()):
        assert resolve_quant(config) is config
    assert quant_name(UserConfig()) == "UserConfig"


def test_int8_config_is_exported_and_hashable():
    assert loadfsm.Int8Config is Int8Config
    assert hash(Int8Config(exclude=["a"])) == hash(Int8Config(exclude=("a",)))


@pytest.mark.parametrize("name", ["lm_head", "model.lm_head", "model.lm_head_norm",
                                  "model.layers.0.mlp.gate", "model.layers.0.mlp.down_proj",
                                  "model.layers.3.block_sparse_moe.router"])
def test_exclude_semantics_match_fp8(name):
    """Int8Config and Fp8Config exclude the same names, by default and when given."""
    assert Int8Config().excludes(name) == Fp8Config().excludes(name)
    patterns = ["lm_head", "*.down_proj"]
    assert Int8Config(exclude=patterns).excludes(name) == Fp8Config(exclude=patterns).excludes(name)


@pytest.mark.parametrize("exclude", ["lm_head", ("lm_head", 3)], ids=["str", "int"])
def test_exclude_validation(exclude):
    with pytest.raises(ValueError, match="exclude"):
        Int8Config(exclude=exclude)


# -- the matmul and the modules ---------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 8, 33], ids=["decode", "kernel-limit", "prefill"])
@pytest.mark.parametrize("k", [64, 72], ids=["k64", "k72"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_matches_full_precision(dtype, k, rows):
    """Int8Linear's output stays >= 35 dB from F.linear on the original weight, on every
    path (kernel or fallback), K a multiple of 16 or not."""
    w, bias, x = _randn(96, k, dtype=dtype), _randn(96, seed=1, dtype=dtype), \
        _randn(rows, k, seed=2, dtype=dtype)
    layer = Int8Linear.from_quantized(*quantize_int8(w), bias, Int8Config())
    out = layer(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    assert sqnr_db(F.linear(x.float(), w.float(), bias.float()), out) >= 35.0


@pytest.mark.skipif(not CPU_KERNEL, reason="this torch has no CPU _weight_int8pack_mm")
@pytest.mark.parametrize("dtype, k, rows, expected", [
    (torch.bfloat16, 64, 1, True), (torch.bfloat16, 4096, 8, True),
    (torch.bfloat16, 72, 1, False),            # K % 16: the AVX-512 kernel reads past rows
    (torch.bfloat16, 64, 9, False),            # prefill: dequantize + F.linear is faster
    (torch.float32, 64, 1, False), (torch.float16, 64, 1, False),   # scalar loops on x86
], ids=["bf16", "bf16-k4096-8rows", "k72", "9rows", "fp32", "fp16"])
def test_which_path_runs_on_cpu(dtype, k, rows, expected):
    """The CPU kernel runs exactly where it is correct and the faster of the two."""
    q, scale = quantize_int8(_randn(32, k, dtype=dtype))
    assert use_int8pack_mm(_randn(rows, k, dtype=dtype), q, scale) is expected


@pytest.mark.skipif(not CPU_KERNEL, reason="this torch has no CPU _weight_int8pack_mm")
def test_kernel_and_fallback_agree(monkeypatch):
    """The kernel and the fallback compute the same product (>= 45 dB of each other)."""
    q, scale = quantize_int8(_randn(64, 256))
    x = _randn(4, 256, seed=3)
    kernel = int8_matmul(x, q, scale, None, torch.bfloat16)
    monkeypatch.setattr(int8_module, "INT8PACK_MAX_ROWS", 0)
    fallback = int8_matmul(x, q, scale, None, torch.bfloat16)
    assert sqnr_db(kernel, fallback) >= 45.0


def test_misaligned_activations_give_the_aligned_result():
    """A view starting mid-storage (unaligned for the kernel's loads) is realigned: the
    result equals that of a fresh copy, bit for bit."""
    q, scale = quantize_int8(_randn(48, 64))
    base = _randn(65 * 2, seed=4)
    x = base[1:129].view(2, 64)                  # 2 bytes past an aligned start
    assert x.data_ptr() % 32
    expected = int8_matmul(x.clone(), q, scale, None, torch.bfloat16)
    assert torch.equal(int8_matmul(x, q, scale, None, torch.bfloat16), expected)


def test_linear_leading_dims():
    """Inputs [B, S, K] give [B, S, N], each row as if run alone."""
    layer = Int8Linear.from_quantized(*quantize_int8(_randn(48, 32)), None, Int8Config())
    x = _randn(2, 3, 32, seed=3)
    out = layer(x)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out[1, 2], layer(x[1, 2:3].clone())[0])


def test_from_quantized_shares_storage_and_reports_its_slots():
    """from_quantized wraps the tensors without a copy; full_precision_slots gives the
    weight and bias a push feeds (the output dtype), config the scheme."""
    q, scale = quantize_int8(_randn(64, 32))
    bias = _randn(64)
    config = Int8Config(exclude=["lm_head"])
    layer = Int8Linear.from_quantized(q, scale, bias, config)
    assert layer.weight.data_ptr() == q.data_ptr()
    assert layer.weight_scale.data_ptr() == scale.data_ptr()
    assert layer.full_precision_slots() == {"weight": ((64, 32), torch.bfloat16),
                                            "bias": ((64,), torch.bfloat16)}
    assert layer.config is config
    assert not any(p.requires_grad for p in layer.parameters())


def test_constructor_allocates_int8():
    layer = Int8Linear(64, 96, True, out_dtype=torch.float16, device="meta")
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (96, 64)
    assert layer.weight_scale.dtype == torch.float16 and layer.weight_scale.shape == (96, 1)
    assert layer.config == Int8Config()


@pytest.mark.parametrize("scale, bias, match", [
    (torch.ones(32), None, "scale"),
    (torch.ones(32, 1, dtype=torch.bfloat16), torch.ones(31), "bias"),
], ids=["scale-shape", "bias-shape"])
def test_from_quantized_rejects_mismatches(scale, bias, match):
    q = torch.zeros(32, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match=match):
        Int8Linear.from_quantized(q, scale, bias, Int8Config())


def _route(tokens, experts, k=2):
    gen = torch.Generator().manual_seed(7)
    topk_ids = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices
    topk_weights = torch.rand(tokens, k, generator=gen).softmax(-1).to(torch.bfloat16)
    return topk_ids, topk_weights


@pytest.mark.parametrize("tokens", [4, 40], ids=["decode", "prefill"])
def test_stacked_experts_match_bf16(tokens):
    """Int8StackedExperts' output stays >= 35 dB from bf16 StackedExperts."""
    ref = StackedExperts(4, 64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref.gate_up_proj.copy_(_randn(4, 64, 64, seed=1))
        ref.down_proj.copy_(_randn(4, 64, 32, seed=2))
    experts = Int8StackedExperts.from_quantized(
        *quantize_int8(ref.gate_up_proj.detach()), *quantize_int8(ref.down_proj.detach()),
        Int8Config())
    x = _randn(tokens, 64, seed=3)
    with torch.no_grad():
        expected = ref(x, *_route(tokens, 4)).float()
    assert sqnr_db(expected, experts(x, *_route(tokens, 4))) >= 35.0
    assert set(experts.full_precision_slots()) == {"gate_up_proj", "down_proj"}
