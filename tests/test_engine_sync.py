"""Engine weight sync: the engine's own load_weights, called again, reloads in place."""

import pytest
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import reference_state_dict
from loadfsm.sources.safetensors_slices import safetensors_weights
from checks import (addresses, assert_loaders_restored, assert_qkv_reloaded, assert_same_tensors,
                    loader_snapshot, old_or_new, snapshot)
from faults import raising_after
from tiny_models import PADDED_SMALL as SMALL
from tiny_models import PADDED_SMALL_MOE as SMALL_MOE
from tiny_models import QKV0, hook_load

QUANTS = [None, "fp8", "fp8-channel"]
QUANT_IDS = ["bf16", "fp8", "fp8ch"]
V1 = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def fresh():
    """State dicts of fresh hook loads by (config, seed, quant), built once per module."""
    cache = {}

    def get(config, seed, quant="fp8"):
        if (config, seed, quant) not in cache:
            model = hook_load(config, reference_state_dict(config, seed).items(), quant)[0]
            cache[config, seed, quant] = snapshot(model)
        return cache[config, seed, quant]

    return get


def _engine(config=SMALL, quant="fp8", **kwargs):
    """A hook-loaded engine model (seed 0) and a sync over its load session."""
    model, session = hook_load(config, reference_state_dict(config, 0).items(), quant)
    return model, loadfsm.WeightSync(model, session=session, **kwargs)


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_with_matches_fresh_hook_load(checkpoint_dir, fresh, config, quant):
    """Load seed 0, push_with load_weights(seed 1 checkpoint): bit-identical to seed 1."""
    model, sync = _engine(config, quant)
    report = sync.push_with(lambda: model.load_weights(safetensors_weights(
        checkpoint_dir(config, 1))), version="step-1")
    assert_same_tensors(model.state_dict(), fresh(config, 1, quant))
    assert report.layers_updated == len(report.committed) > 0
    assert sync.session.ledger.staging == 0
    assert report.version == sync.version == "step-1"
    assert {sync.layer_versions[name] for name in report.committed} == {"step-1"}


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_with_keeps_every_address(config, quant):
    """No parameter or buffer changes data_ptr, shape, stride or dtype across push_with."""
    model, sync = _engine(config, quant)
    before = addresses(model)
    sync.push_with(lambda: model.load_weights(reference_state_dict(config, 1).items()))
    assert addresses(model) == before


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_push_with_restores_every_loader(quant):
    """After push_with each live parameter holds exactly the attributes it had before."""
    model, sync = _engine(SMALL, quant)
    loaders = loader_snapshot(model)
    sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, 1).items()))
    assert_loaders_restored(loaders)


def test_push_with_restores_loaders_when_fn_raises():
    """An exception inside fn still gives every loader back exactly."""
    model, sync = _engine(SMALL)
    loaders = loader_snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    with pytest.raises(loadfsm.PushError, match="disk gone"):
        sync.push_with(lambda: model.load_weights(raising_after(items, 7, OSError("disk gone"))))
    assert_loaders_restored(loaders)


def test_push_with_second_push_runs_the_engine_loaders_again(fresh):
    """Two pushes in a row (seed 1, then seed 0) each give the fresh load of their weights."""
    model, sync = _engine(SMALL)
    for seed in (1, 0):
        sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, seed).items()))
        assert_same_tensors(model.state_dict(), fresh(SMALL, seed))


def test_pushed_layer_transition_sequence_is_exact():
    """A fused qkv layer logs reload, arrive x3, complete, quantize, finalize."""
    model, session = hook_load(SMALL, reference_state_dict(SMALL, 0).items(), "fp8")
    sync = loadfsm.WeightSync(model, session=session, trace=True)
    with capture_logs() as logs:
        sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, 1).items()))
    assert_qkv_reloaded(logs, QKV0)


def test_partial_push_with_leaves_untouched_layers_identical(fresh):
    """Loading only attention projections changes those layers and nothing else."""
    model, sync = _engine(SMALL_MOE)
    old = snapshot(model)
    attn = [(n, t) for n, t in reference_state_dict(SMALL_MOE, 1).items() if ".self_attn." in n]
    report = sync.push_with(lambda: model.load_weights(attn))
    verdict = old_or_new(model, old, fresh(SMALL_MOE, 1))
    new_layers = sorted(layer for layer, kind in verdict.items() if kind == "new")
    assert new_layers == sorted(report.committed)
    assert all(".self_attn." in layer for layer in new_layers)
    assert len(new_layers) == 2 * SMALL_MOE.num_layers     # qkv_proj and o_proj per layer


def test_missing_shard_raises_naming_layer_and_piece(fresh):
    """A layer whose v shard never came keeps its old weights; the error names both."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    items = [(n, t) for n, t in reference_state_dict(SMALL, 1).items()
             if n != "model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(loadfsm.PushError, match=r"qkv_proj\.weight\[v\]") as info:
        sync.push_with(lambda: model.load_weights(items))
    assert QKV0 in str(info.value) and info.value.layer == QKV0
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[QKV0] == "old" and QKV0 not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_exception_midway_rolls_back_and_retry_succeeds(config, fresh):
    """fn raising halfway leaves layers wholly old or new, lists committed; retry works."""
    model, sync = _engine(config, commit_bytes=0)
    old = snapshot(model)
    items = list(reference_state_dict(config, 1).items())
    gone = ConnectionError("trainer went away")
    with pytest.raises(loadfsm.PushError, match="trainer went away") as info:
        sync.push_with(lambda: model.load_weights(raising_after(items, len(items) // 2, gone)))
    assert info.value.__cause__ is gone
    verdict = old_or_new(model, old, fresh(config, 1))
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")
    assert info.value.committed and "old" in verdict.values()
    assert all(r.state is loadfsm.LayerState.FINALIZED and not r.staging
               for r in sync.session.plan.layers.values())
    assert sync.session.ledger.staging == 0
    sync.push_with(lambda: model.load_weights(items))
    assert_same_tensors(model.state_dict(), fresh(config, 1))


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_nan_shard_is_refused_before_anything_is_written(quant):
    """NaN in one shard: PushError caused by NonFiniteWeightError; the model stays old."""
    model, sync = _engine(SMALL, quant, atomic="model")
    old = snapshot(model)
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(_seed1_with_nan_in_v1()))
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)
    assert info.value.__cause__.layer == "model.layers.1.self_attn.qkv_proj"
    assert info.value.committed == []
    assert_same_tensors(model.state_dict(), old)


def _seed1_with_nan_in_v1():
    """Seed-1 checkpoint tensors with one NaN in layer 1's v_proj."""
    state = reference_state_dict(SMALL, 1)
    state[V1] = state[V1].clone()
    state[V1][0, 0] = float("nan")
    return state.items()


def test_nan_shard_rolls_back_only_its_layer(fresh):
    """Per-layer atomicity: the NaN layer stays wholly old, the others are wholly new."""
    model, sync = _engine(SMALL, commit_bytes=0)
    old = snapshot(model)
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(_seed1_with_nan_in_v1()))
    failed = "model.layers.1.self_attn.qkv_proj"
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[failed] == "old" and failed not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


def test_model_atomic_failure_commits_nothing():
    """With atomic='model' a failure at the last loader call leaves the whole model old."""
    model, sync = _engine(SMALL, atomic="model")
    old = snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(
            raising_after(items, len(items) - 1, OSError("disk gone"))))
    assert info.value.committed == []
    assert_same_tensors(model.state_dict(), old)
    assert sync.session.ledger.staging == 0
