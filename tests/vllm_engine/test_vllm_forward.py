"""A forward of vLLM's own Llama on CPU: loadfsm's load gives vLLM's logits exactly, and
FP8 stays >= 25 dB from them."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import loadfsm  # noqa: E402
import vllm_models as models  # noqa: E402
from loadfsm.quant.fp8 import sqnr_db  # noqa: E402
from vllm_models import weights  # noqa: E402


class CausalAttention(nn.Module):
    """Stands in for vLLM's ``Attention``, whose CPU backend needs a scheduler's metadata:
    plain causal attention over one sequence (q, k, v: [T, heads * head_size])."""

    def __init__(self, attn):
        super().__init__()
        self.heads, self.kv_heads, self.size = attn.num_heads, attn.num_kv_heads, attn.head_size
        self.scale = attn.impl.scale

    def forward(self, q, k, v, *args, **kwargs):
        t = q.shape[0]
        q, k, v = (x.view(t, n, self.size).transpose(0, 1)
                   for x, n in ((q, self.heads), (k, self.kv_heads), (v, self.kv_heads)))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=True)
        return out.transpose(0, 1).reshape(t, self.heads * self.size)


def logits(model, config) -> torch.Tensor:
    """Logits of one 12-token sequence, through vLLM's own layers (custom ops off)."""
    for module in model.modules():
        if hasattr(module, "quant_method") and "Unquantized" in type(module.quant_method).__name__:
            # vLLM's CPU GEMM fallback (its packed kernels live in vllm._C, a CUDA build here)
            module.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)
    for layer in model.model.layers:
        layer.self_attn.attn = CausalAttention(layer.self_attn.attn)
    ids = torch.randint(0, 250, (12,), generator=torch.Generator().manual_seed(0))
    with models.current(config), torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(12))).float()


def load(ckpt, device, quant=None):
    model, config = models.build(ckpt, device, forward=True)
    with models.current(config):
        if device == "cpu":
            model.load_weights(weights(ckpt))
        else:
            with loadfsm.LoadSession(model, quant=quant, device="cpu"):
                model.load_weights(weights(ckpt))
    return logits(model, config)


@pytest.fixture(scope="module")
def vllm_logits(ckpts, dist):
    return load(ckpts["llama"][0], "cpu")


def test_logits_identical_to_vllm_load(ckpts, vllm_logits):
    """quant=None: logits bit-identical to vLLM's own load."""
    assert torch.equal(load(ckpts["llama"][0], "meta"), vllm_logits)


@pytest.mark.parametrize("quant", ["fp8", "fp8-channel"])
def test_fp8_logits_within_25_db(ckpts, vllm_logits, quant):
    """FP8 (vLLM's layout, dequantized GEMM) stays >= 25 dB from the bf16 logits."""
    db = sqnr_db(vllm_logits, load(ckpts["llama"][0], "meta", quant))
    print(f"llama {quant} logits SQNR {db:.1f} dB")
    assert db >= 25.0
