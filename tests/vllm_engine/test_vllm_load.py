"""vLLM's own model classes loaded through the engine hook, compared with vLLM's own load."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

import loadfsm  # noqa: E402
from loadfsm import LayerState  # noqa: E402

import vllm_models as models  # noqa: E402
from vllm_models import state, weights  # noqa: E402


def hooked_load(ckpt, **options):
    model, config = models.build(ckpt, "meta")
    with models.current(config):
        with loadfsm.LoadSession(model, device="cpu", **options) as session:
            names = model.load_weights(weights(ckpt))
    return model, names, session.report


@pytest.mark.parametrize("kind", models.MODELS)
def test_bit_identical_to_vllm_load(kind, ckpts, dist, reference):
    """quant=None: every layer FINALIZED, every tensor equal to vLLM's own load, same names."""
    model, names, report = hooked_load(ckpts[kind][0])
    ref, ref_names = reference[kind]
    assert set(report.layer_states.values()) == {"FINALIZED"}
    assert names == ref_names
    ours, theirs = state(model), state(ref)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def test_rotary_caches_computed_on_a_meta_built_model(ckpts, dist, reference, monkeypatch):
    """The load computes the rotary caches of a model built on meta, equal to vLLM's own
    (vLLM's get_rope cache emptied first, so no rotary module is shared with a CPU model)."""
    from vllm.model_executor.layers import rotary_embedding
    monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
    model, _, _ = hooked_load(ckpts["llama"][0])
    caches = {n: b for n, b in model.named_buffers() if n.endswith("cos_sin_cache")}
    theirs = dict(reference["llama"][0].named_buffers())
    assert caches
    for name, cache in caches.items():
        assert not cache.is_meta and torch.equal(cache, theirs[name]), name


def loader_of(param):
    return vars(param).get("_weight_loader", vars(param).get("weight_loader"))


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_classes_and_loaders_kept(kind, ckpts, dist, reference):
    """After the session every parameter has vLLM's class and the very same loader object,
    so vLLM's own load_weights works on the loaded model."""
    model, config = models.build(ckpts[kind][0], "meta")
    before = {n: (type(p), loader_of(p)) for n, p in model.named_parameters()}
    with models.current(config):
        with loadfsm.LoadSession(model, device="cpu"):
            model.load_weights(weights(ckpts[kind][0]))
        after = {n: (type(p), loader_of(p)) for n, p in model.named_parameters()}
        assert after.keys() == before.keys()
        for name, (cls, loader) in before.items():
            assert after[name][0] is cls, name
            assert after[name][1] is loader, name
        names = model.load_weights(weights(ckpts[kind][1]))     # vLLM's own, unhooked
    fresh = models.vllm_load(ckpts[kind][1])
    assert names == fresh[1]
    for name, tensor in state(fresh[0]).items():
        assert torch.equal(state(model)[name], tensor), name


def test_loaders_kept_after_a_session_that_raised(ckpts, dist):
    """A load that raises mid-way gives every loader back: vLLM's own load then works."""
    model, config = models.build(ckpts["mixtral"][0], "meta")
    before = {n: loader_of(p) for n, p in model.named_parameters()}
    good = weights(ckpts["mixtral"][0])
    with models.current(config):
        with pytest.raises(RuntimeError, match="boom"):
            with loadfsm.LoadSession(model, device="cpu"):
                model.load_weights(good[: len(good) // 2])
                raise RuntimeError("boom")
        assert {n: loader_of(p) for n, p in model.named_parameters()} == before
        assert all(loader is not None for loader in before.values() if loader is not None)


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen3_moe"])
def test_push_with_reloads_in_place(kind, ckpts, dist, reference):
    """push_with(model.load_weights(new)) equals a fresh load of new, no address moved."""
    model, config = models.build(ckpts[kind][0], "meta")
    with models.current(config):
        with loadfsm.LoadSession(model, device="cpu") as session:
            model.load_weights(weights(ckpts[kind][0]))
        ptrs = {n: t.data_ptr() for n, t in state(model).items()}
        sync = loadfsm.WeightSync(model, session=session)
        sync.push_with(lambda: model.load_weights(weights(ckpts[kind][1])))
    fresh, _ = models.vllm_load(ckpts[kind][1])
    ours = state(model)
    assert {n: t.data_ptr() for n, t in ours.items()} == ptrs
    for name, tensor in state(fresh).items():
        assert torch.equal(ours[name], tensor), name


def test_loadfsm_never_imports_vllm():
    """vLLM installed but not imported: an engine-hook load leaves it unimported."""
    import subprocess
    import sys
    code = ("import sys, torch, loadfsm\n"
            "from torch import nn\n"
            "with torch.device('meta'):\n"
            "    m = nn.Linear(4, 4, bias=False)\n"
            "m.weight.weight_loader = lambda p, w: p.data.copy_(w)\n"
            "with loadfsm.LoadSession(m, quant='fp8', device='cpu'):\n"
            "    m.weight.weight_loader(m.weight, torch.ones(4, 4))\n"
            "assert 'vllm' not in sys.modules, 'vllm imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
