"""torch.profiler ranges: every layer's quantize and commit, only while a profiler runs."""

import pytest
import torch

import loadfsm
from loadfsm.testing import build_model, reference_state_dict
from tiny_models import SMALL


def _ranges(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events() if e.name.startswith("loadfsm:")}


def _layers():
    return list(loadfsm.LoadSession(build_model(SMALL), device="cpu").plan.layers)


def test_load_ranges_name_every_layer_and_step():
    """Inside a profile, each layer has a quantize and a commit range."""
    names = _ranges(lambda: loadfsm.load(build_model(SMALL), reference_state_dict(SMALL).items(),
                                         quant="fp8", device="cpu"))
    expected = {f"loadfsm:{layer}:{step}" for layer in _layers()
                for step in ("quantize", "commit")}
    assert names == expected


def test_push_ranges_name_every_pushed_layer():
    """A push's re-quantize and in-place commit show up the same way."""
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL).items(), quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model)
    name = "model.layers.0.self_attn.o_proj.weight"
    names = _ranges(lambda: sync.push([(name, reference_state_dict(SMALL, 1)[name])]))
    assert names == {"loadfsm:model.layers.0.self_attn.o_proj:quantize",
                     "loadfsm:model.layers.0.self_attn.o_proj:commit"}


def test_no_range_is_made_without_a_profiler(monkeypatch):
    """With no profiler running, record_function is never called."""
    def refuse(name):
        raise AssertionError(f"record_function({name!r}) without a profiler")
    monkeypatch.setattr("loadfsm.profiling.record_function", refuse)
    report = loadfsm.load(build_model(SMALL), reference_state_dict(SMALL).items(), quant="fp8",
                          device="cpu")
    assert report.states["FINALIZED"] == len(_layers())
    with pytest.raises(AssertionError, match="without a profiler"):
        _ranges(lambda: loadfsm.load(build_model(SMALL), reference_state_dict(SMALL).items(),
                                     quant="fp8", device="cpu"))
