"""Online FP8 on vLLM's own classes: every linear and expert weight FP8 in the layout
vLLM's own online FP8 path leaves (``loadfsm.integrations.vllm_fp8``), routers bf16."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.linear import LinearBase  # noqa: E402

import loadfsm  # noqa: E402
import vllm_models as models  # noqa: E402
from loadfsm.integrations.vllm_fp8 import UnsupportedFp8LayoutError  # noqa: E402
from vllm_models import state, vllm_load, weights  # noqa: E402

FP8 = torch.float8_e4m3fn


def fp8_load(ckpt, quant="fp8"):
    model, config = models.build(ckpt, "meta")
    with models.current(config):
        with loadfsm.LoadSession(model, quant=quant, device="cpu") as session:
            model.load_weights(weights(ckpt))
    return model, config, session


def is_router(name):
    last = name.rpartition(".")[2]
    return last == "gate" or last.endswith("_gate")


@pytest.mark.parametrize("kind", models.MODELS)
def test_every_linear_and_expert_is_fp8_in_vllm_layout(kind, ckpts, dist, reference):
    """Linears: weight [K, N] = q.t() with a [1] scale; experts [E, N, K] with [E] scales;
    routers and gates bf16; everything else bit-identical to vLLM's own load."""
    model, _, session = fp8_load(ckpts[kind][0])
    assert set(session.report.layer_states.values()) == {"FINALIZED"}
    ref = dict(reference[kind][0].named_modules())
    linears = experts = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not name.startswith("lm_head"):
            bf16 = ref[name].weight
            if is_router(name):
                assert module.weight.dtype == torch.bfloat16 and torch.equal(module.weight, bf16)
                continue
            linears += 1
            w = module.weight
            assert w.dtype == FP8 and w.shape == bf16.t().shape and w.t().is_contiguous()
            assert module.weight_scale.shape == (1,) and module.input_scale is None
            dq = w.t().float() * module.weight_scale
            assert (dq - bf16.float()).abs().max() <= bf16.float().abs().max() / 16
        elif isinstance(module, RoutedExperts):
            experts += 1
            for attr in ("w13_weight", "w2_weight"):
                w, bf16 = getattr(module, attr), getattr(ref[name], attr)
                scale = getattr(module, f"{attr}_scale")
                assert w.dtype == FP8 and w.shape == bf16.shape and w.is_contiguous()
                assert scale.shape == (w.shape[0],) and scale.dtype == torch.float32
                dq = w.float() * scale[:, None, None]
                assert (dq - bf16.float()).abs().max() <= bf16.float().abs().max() / 16
    assert linears >= 4 and (experts == 2) == (kind in ("mixtral", "qwen2_moe", "qwen3_moe"))
    theirs = state(reference[kind][0])
    for name, tensor in state(model).items():
        if tensor.dtype != FP8 and name in theirs and tensor.shape == theirs[name].shape \
                and not name.endswith("_scale"):
            assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_fp8_parameters_keep_vllm_class_and_loader(kind, ckpts, dist):
    """Every parameter, FP8 weights included, is vLLM's parameter class with the very same
    loader object, as vLLM's own replace_parameter leaves them."""
    model, config = models.build(ckpts[kind][0], "meta")
    before = {n: (type(p), vars(p).get("_weight_loader", vars(p).get("weight_loader")))
              for n, p in model.named_parameters()}
    with models.current(config):
        with loadfsm.LoadSession(model, quant="fp8", device="cpu"):
            model.load_weights(weights(ckpts[kind][0]))
    after = dict(model.named_parameters())
    for name, (cls, loader) in before.items():
        p = after[name]
        assert type(p) is cls, name
        assert vars(p).get("_weight_loader", vars(p).get("weight_loader")) is loader, name
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_fp8_push_with_in_place_equals_fresh_load(kind, ckpts, dist):
    """push_with into an FP8 model equals a fresh FP8 load of the new weights, in place."""
    model, config, session = fp8_load(ckpts[kind][0])
    ptrs = {n: t.data_ptr() for n, t in state(model).items()}
    with models.current(config):
        loadfsm.WeightSync(model, session=session).push_with(
            lambda: model.load_weights(weights(ckpts[kind][1])))
    fresh, _, _ = fp8_load(ckpts[kind][1])
    ours = state(model)
    assert {n: t.data_ptr() for n, t in ours.items()} == ptrs
    for name, tensor in state(fresh).items():
        assert tensor.dtype == ours[name].dtype and torch.equal(
            ours[name].view(torch.uint8) if tensor.dtype == FP8 else ours[name],
            tensor.view(torch.uint8) if tensor.dtype == FP8 else tensor), name


def test_fp8_block_is_refused(ckpts, dist):
    """fp8-block has no vLLM online layout: a typed error, not silent bf16."""
    with pytest.raises(UnsupportedFp8LayoutError):
        fp8_load(ckpts["llama"][0], quant="fp8-block")
