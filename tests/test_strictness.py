"""The finalize sweep's strictness: missing and unexpected tensors, raised or reported."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

import loadfsm
from loadfsm.api import run
from loadfsm.sources.base import IteratorSource
from loadfsm.sources.checkpoint_files import INDEX_NAME
from loadfsm.testing import build_model, reference_state_dict, write_checkpoint

GONE = "model.layers.1.self_attn.k_proj.weight"       # a piece of a fused qkv layer
GONE_LAYER = "model.layers.1.self_attn.qkv_proj"
EXTRA = ["zzz.bias", "aaa.weight", "model.layers.0.mlp.extra"]


def _drop_from_shard(directory, name):
    """Remove ``name`` from the shard holding it; the index still names that shard."""
    weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    shard = directory / weight_map[name]
    state = load_file(shard)
    del state[name]
    save_file(state, str(shard))
    return shard


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    missing = write_checkpoint("tiny", root / "missing", max_shard_bytes=4 << 20)
    shard = _drop_from_shard(missing, GONE)
    no_index = write_checkpoint("tiny", root / "no_index", index=False)
    _drop_from_shard_without_index(no_index, GONE)
    state = reference_state_dict("tiny")
    extra = root / "extra.safetensors"
    save_file(state | {name: torch.zeros(2) for name in EXTRA}, str(extra))
    both = root / "both.safetensors"
    save_file({k: v for k, v in state.items() if k != GONE} | {"zzz.bias": torch.zeros(2)},
              str(both))
    return {"missing": missing, "shard": shard, "no_index": no_index, "extra": extra,
            "both": both}


def _drop_from_shard_without_index(directory, name):
    for shard in directory.glob("*.safetensors"):
        state = load_file(shard)
        if name in state:
            del state[name]
            save_file(state, str(shard))


def _load(path, strict=True, quant="fp8"):
    model = build_model("tiny")
    return model, loadfsm.load(model, path, quant=quant, device="cpu", strict=strict)


def test_missing_tensor_error_lists_layer_and_name(ckpts):
    """IncompleteLoadError names each incomplete layer and exactly the pieces it misses."""
    with pytest.raises(loadfsm.IncompleteLoadError, match=f"{GONE_LAYER}: missing {GONE}") as err:
        _load(ckpts["missing"])
    assert err.value.missing == {GONE_LAYER: [GONE]} and err.value.layer == GONE_LAYER


def test_missing_tensor_error_names_the_indexed_file(ckpts):
    """When the index says which shard should hold the tensor, the message names that file."""
    with pytest.raises(loadfsm.IncompleteLoadError) as err:
        _load(ckpts["missing"])
    assert f"{GONE} (index: {ckpts['shard']})" in str(err.value)


def test_missing_tensor_without_index_names_no_file(ckpts):
    """Without an index the message lists the name alone: no file is guessed."""
    with pytest.raises(loadfsm.IncompleteLoadError) as err:
        _load(ckpts["no_index"])
    assert f"missing {GONE}" in str(err.value) and "index:" not in str(err.value)


def test_missing_tensors_listed_per_layer_sorted():
    """Several missing pieces in several layers: one line per layer, names sorted."""
    state = reference_state_dict("tiny")
    gone = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.norm.weight"]
    stream = [(k, v) for k, v in state.items() if k not in gone]
    with pytest.raises(loadfsm.IncompleteLoadError) as err:
        loadfsm.load(build_model("tiny"), stream, device="cpu")
    assert err.value.missing == {"model.layers.0.mlp.gate_up_proj": sorted(gone[:2]),
                                 "model.norm": ["model.norm.weight"]}
    assert "model.layers.0.mlp.gate_up_proj: missing " + ", ".join(sorted(gone[:2])) \
        in str(err.value)


def test_unexpected_error_lists_names_sorted(ckpts):
    """UnexpectedWeightError lists every unexpected tensor, sorted, in message and .names."""
    with pytest.raises(loadfsm.UnexpectedWeightError) as err:
        _load(ckpts["extra"])
    assert err.value.names == sorted(EXTRA)
    assert ", ".join(sorted(EXTRA)) in str(err.value)


def test_unexpected_raises_before_any_layer_loads(ckpts):
    """In strict mode an unexpected name is found from headers: no layer is touched."""
    model = build_model("tiny")
    with pytest.raises(loadfsm.UnexpectedWeightError):
        loadfsm.load(model, ckpts["extra"], device="cpu")
    assert all(p.is_meta for p in model.parameters())


def test_non_strict_reports_missing_and_unexpected(ckpts):
    """strict=False returns the missing pieces per layer and the unexpected names in the report."""
    _, report = _load(ckpts["both"], strict=False)
    assert report.missing == {GONE_LAYER: [GONE]}
    assert report.unexpected == ["zzz.bias"]


def test_non_strict_incomplete_layer_stays_on_meta(ckpts):
    """The incomplete layer is never finalized: it stays META, parameters on meta, no staging."""
    model, report = _load(ckpts["missing"], strict=False)
    assert report.layer_states[GONE_LAYER] == "META"
    assert model.model.layers[1].self_attn.qkv_proj.weight.is_meta
    assert type(model.model.layers[1].self_attn.qkv_proj) is torch.nn.Linear   # not swapped
    assert report.states["FINALIZED"] == len(report.layer_states) - 1
    assert report.peak_bytes >= report.final_bytes     # ledger holds nothing for the layer


def test_non_strict_iterator_incomplete_layer_keeps_no_staging():
    """From an iterator a layer may be PARTIAL at the end: staging freed, parameters on meta."""
    stream = [(k, v) for k, v in reference_state_dict("tiny").items() if k != GONE]
    model = build_model("tiny")
    session = loadfsm.LoadSession(model, quant="fp8", device="cpu", strict=False)
    report = run(session, IteratorSource(stream))
    rec = session.plan.layers[GONE_LAYER]
    assert report.layer_states[GONE_LAYER] == "PARTIAL" and rec.staging == {}
    assert GONE_LAYER not in session.driver.in_flight and session.ledger.staging == 0
    assert model.model.layers[1].self_attn.qkv_proj.weight.is_meta
    assert report.missing == {GONE_LAYER: [GONE]}


def test_non_strict_logs_a_warning(ckpts):
    """strict=False logs what is missing and what was unexpected as warnings, tracing or not."""
    with capture_logs() as logs:
        _load(ckpts["both"], strict=False)
    warnings = {e["event"]: e for e in logs if e["log_level"] == "warning"}
    assert warnings["load_incomplete"]["missing"] == {GONE_LAYER: [GONE]}
    assert warnings["unexpected_weights"]["names"] == ["zzz.bias"]
