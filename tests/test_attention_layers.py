"""Attention layers: kv-cache scales loaded or defaulted; rotary tables computed, never
overwritten."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

import loadfsm
from loadfsm.quant.kv_cache import CHECKPOINT_KV_SCALES as SCALES
from loadfsm.quant.kv_cache import DEFAULT_KV_SCALE
from loadfsm.testing import CONFIGS, build_model, reference_state_dict, write_checkpoint

PLAIN = CONFIGS["tiny"]
WITH_SCALES = replace(PLAIN, kv_cache_scales=True)
ATTN = [f"model.layers.{i}.self_attn.attn" for i in range(PLAIN.num_layers)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """tiny without scales, with all three, and with k/v only (q_scale dropped)."""
    root = tmp_path_factory.mktemp("attn")
    plain = write_checkpoint(PLAIN, root / "plain")
    scales = write_checkpoint(WITH_SCALES, root / "scales")
    kv_only = write_checkpoint(WITH_SCALES, root / "kv_only", index=False)
    (shard,) = kv_only.glob("*.safetensors")
    state = {k: v for k, v in load_file(shard).items() if not k.endswith("q_scale")}
    save_file(state, str(shard))
    return {"plain": plain, "scales": scales, "kv_only": kv_only}


def _load(path, quant="fp8", model=None, **kwargs):
    model = build_model(PLAIN) if model is None else model
    with capture_logs() as logs:
        report = loadfsm.load(model, path, quant=quant, device="cpu", trace=True, **kwargs)
    return model, report, logs


def _attn(model, i=0):
    return model.model.layers[i].self_attn.attn


@pytest.mark.parametrize("quant", ["fp8", None], ids=["fp8", "bf16"])
def test_checkpoint_scales_are_used(ckpts, quant):
    """Scales the checkpoint carries are loaded as they are, and the layer is FINALIZED."""
    model, report, _ = _load(ckpts["scales"], quant)
    ref = reference_state_dict(WITH_SCALES)
    for i, layer in enumerate(ATTN):
        assert report.layer_states[layer] == "FINALIZED"
        for name in SCALES:
            loaded = getattr(_attn(model, i), name)
            assert torch.equal(loaded, ref[f"model.layers.{i}.self_attn.{name}"]), name
    assert report.defaulted == []


def test_checkpoint_scales_arrive_as_pieces(ckpts):
    """Each scale arrives once as a piece of its attention layer, like any other weight."""
    _, _, logs = _load(ckpts["scales"])
    arrived = [e["piece"] for e in logs if e["event"] == "layer_transition"
               and e["trigger"] == "arrive" and e["layer"] == ATTN[0]]
    assert sorted(arrived) == sorted(f"model.layers.0.self_attn.{n}" for n in SCALES)


def test_absent_scales_default_to_one(ckpts):
    """Without scales in the checkpoint every attention layer is FINALIZED with 1.0 scales."""
    model, report, _ = _load(ckpts["plain"])
    for i, layer in enumerate(ATTN):
        assert report.layer_states[layer] == "FINALIZED"
        for name in SCALES:
            scale = getattr(_attn(model, i), name)
            assert scale.dtype == torch.float32 and float(scale) == DEFAULT_KV_SCALE
    assert report.defaulted == ATTN


def test_absent_scales_emit_layer_defaulted(ckpts):
    """Each defaulted attention layer gets one layer_defaulted event naming its scales."""
    _, _, logs = _load(ckpts["plain"])
    events = [e for e in logs if e["event"] == "layer_defaulted"]
    assert [e["layer"] for e in events] == ATTN
    assert sorted(events[0]["pieces"]) == sorted(f"model.layers.0.self_attn.{n}" for n in SCALES)


def test_absent_scales_transition_by_default_trigger(ckpts):
    """A layer that no checkpoint tensor feeds goes META -> COMPLETE by `default`, then on."""
    _, _, logs = _load(ckpts["plain"])
    steps = [(e["src"], e["dst"], e["trigger"]) for e in logs
             if e["event"] == "layer_transition" and e["layer"] == ATTN[0]]
    assert steps == [("META", "COMPLETE", "default"), ("COMPLETE", "QUANTIZED", "quantize"),
                     ("QUANTIZED", "FINALIZED", "finalize")]


def test_partly_present_scales_load_and_default(ckpts):
    """k/v scales present, q_scale absent: k/v loaded, q_scale 1.0, and the trace says so."""
    model, report, logs = _load(ckpts["kv_only"])
    ref = reference_state_dict(WITH_SCALES)
    attn = _attn(model)
    assert torch.equal(attn.k_scale, ref["model.layers.0.self_attn.k_scale"])
    assert float(attn.q_scale) == DEFAULT_KV_SCALE
    assert report.layer_states[ATTN[0]] == "FINALIZED" and ATTN[0] in report.defaulted
    events = {e["layer"]: e["pieces"] for e in logs if e["event"] == "layer_defaulted"}
    assert events[ATTN[0]] == ["model.layers.0.self_attn.q_scale"]


def test_scales_iterator_without_scales_defaults(ckpts):
    """A user iterator that carries no scales still ends with every attention layer FINALIZED."""
    state = reference_state_dict(PLAIN)
    model, report, _ = _load(list(state.items()))
    assert all(report.layer_states[layer] == "FINALIZED" for layer in ATTN)
    assert float(_attn(model).k_scale) == DEFAULT_KV_SCALE


# -- rotary tables: non-persistent buffers ---------------------------------------------
def _rotaries(model):
    return [layer.self_attn.rotary for layer in model.model.layers]


def test_rotary_tables_computed_on_target_device(ckpts):
    """After load the cos/sin tables equal those of a CPU-built model and are not on meta."""
    model, _, _ = _load(ckpts["plain"])
    reference = build_model(PLAIN, "cpu")
    for got, want in zip(_rotaries(model), _rotaries(reference)):
        for name in ("cos_cached", "sin_cached"):
            buf = getattr(got, name)
            assert not buf.is_meta and buf.device.type == "cpu"
            assert torch.equal(buf, getattr(want, name))


def test_rotary_tables_are_not_checkpoint_names(ckpts):
    """A checkpoint tensor named like a rotary table is unexpected: the tables are never loaded."""
    state = reference_state_dict(PLAIN)
    state["model.layers.0.self_attn.rotary.cos_cached"] = torch.zeros(PLAIN.max_seq_len,
                                                                      PLAIN.head_dim)
    with pytest.raises(loadfsm.UnexpectedWeightError, match="rotary.cos_cached"):
        _load(list(state.items()))


def test_load_keeps_tables_already_computed(ckpts):
    """A table that is already off meta is left alone: same storage, same values."""
    model = build_model(PLAIN)
    rotary = _rotaries(model)[0]
    rotary.compute_buffers("cpu")
    rotary.cos_cached.fill_(7.0)
    ptr = rotary.cos_cached.data_ptr()
    _load(ckpts["plain"], model=model)
    assert rotary.cos_cached.data_ptr() == ptr and bool((rotary.cos_cached == 7.0).all())
    assert not _rotaries(model)[1].cos_cached.is_meta


def test_second_load_does_not_overwrite_tables(ckpts, tmp_path):
    """Loading new weights into a loaded model replaces weights but never the rotary tables."""
    model, _, _ = _load(ckpts["plain"], quant=None)
    rotary = _rotaries(model)[1]
    rotary.sin_cached.fill_(-3.0)
    ptr = rotary.sin_cached.data_ptr()
    other = write_checkpoint(PLAIN, tmp_path / "seed1", seed=1)
    _load(other, quant=None, model=model)
    assert rotary.sin_cached.data_ptr() == ptr and bool((rotary.sin_cached == -3.0).all())
    ref = reference_state_dict(PLAIN, seed=1)
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"])
