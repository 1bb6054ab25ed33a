"""Engine weight sync: the engine's own load_weights, called again, reloads in place."""

import pytest
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import reference_state_dict, write_checkpoint
from loadfsm.sources.safetensors_slices import safetensors_weights
from test_engine_hook import (QKV0, SMALL, SMALL_MOE, _assert_restored, _loader_snapshot,
                              engine_model)
from test_weight_sync import SMALL as LLAMA_SMALL
from test_weight_sync import (_addresses, _assert_equal_models, _layers_old_or_new, _snapshot,
                              assert_qkv_reloaded)
from test_weight_sync import _engine as _loaded

QUANTS = [None, "fp8", "fp8-channel"]
QUANT_IDS = ["bf16", "fp8", "fp8ch"]
V1 = "model.layers.1.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Checkpoint directories by (config, seed), written once per module."""
    root, paths = tmp_path_factory.mktemp("ckpt"), {}

    def get(config, seed):
        if (config, seed) not in paths:
            paths[config, seed] = write_checkpoint(config, root / f"{len(paths)}", seed=seed,
                                                   max_shard_bytes=200_000)
        return paths[config, seed]

    return get


@pytest.fixture(scope="module")
def fresh():
    """State dicts of fresh hook loads by (config, seed, quant), built once per module."""
    cache = {}

    def get(config, seed, quant="fp8"):
        if (config, seed, quant) not in cache:
            model = _hook_load(config, reference_state_dict(config, seed), quant)[0]
            cache[config, seed, quant] = _snapshot(model)
        return cache[config, seed, quant]

    return get


def _hook_load(config, state, quant="fp8"):
    model = engine_model(config)
    with loadfsm.LoadSession(model, quant=quant, device="cpu") as session:
        model.load_weights(state.items())
    return model, session


def _engine(config=SMALL, quant="fp8", **kwargs):
    """A hook-loaded engine model (seed 0) and a sync over its load session."""
    model, session = _hook_load(config, reference_state_dict(config, 0), quant)
    return model, loadfsm.WeightSync(model, session=session, **kwargs)


def _failing(items, at, exc):
    yield from items[:at]
    raise exc


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_with_matches_fresh_hook_load(checkpoint, fresh, config, quant):
    """Load seed 0, push_with load_weights(seed 1 checkpoint): bit-identical to seed 1."""
    model, sync = _engine(config, quant)
    report = sync.push_with(lambda: model.load_weights(safetensors_weights(
        checkpoint(config, 1))))
    _assert_equal_models(model, fresh(config, 1, quant))
    assert report.layers_updated == len(report.committed) > 0
    assert sync.session.ledger.staging == 0


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_with_keeps_every_address(config, quant):
    """No parameter or buffer changes data_ptr, shape, stride or dtype across push_with."""
    model, sync = _engine(config, quant)
    before = _addresses(model)
    sync.push_with(lambda: model.load_weights(reference_state_dict(config, 1).items()))
    assert _addresses(model) == before


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_push_with_restores_every_loader(quant):
    """After push_with each live parameter holds exactly the attributes it had before."""
    model, sync = _engine(SMALL, quant)
    snapshot = _loader_snapshot(model)
    sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, 1).items()))
    _assert_restored(snapshot)


def test_push_with_restores_loaders_when_fn_raises():
    """An exception inside fn still gives every loader back exactly."""
    model, sync = _engine(SMALL)
    snapshot = _loader_snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    with pytest.raises(loadfsm.PushError, match="disk gone"):
        sync.push_with(lambda: model.load_weights(_failing(items, 7, OSError("disk gone"))))
    _assert_restored(snapshot)


def test_push_with_second_push_runs_the_engine_loaders_again(fresh):
    """Two pushes in a row (seed 1, then seed 0) each give the fresh load of their weights."""
    model, sync = _engine(SMALL)
    for seed in (1, 0):
        sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, seed).items()))
        _assert_equal_models(model, fresh(SMALL, seed))


def test_pushed_layer_transition_sequence_is_exact():
    """A fused qkv layer logs reload, arrive x3, complete, quantize, finalize."""
    model, session = _hook_load(SMALL, reference_state_dict(SMALL, 0))
    sync = loadfsm.WeightSync(model, session=session, trace=True)
    with capture_logs() as logs:
        sync.push_with(lambda: model.load_weights(reference_state_dict(SMALL, 1).items()))
    assert_qkv_reloaded(logs, QKV0)


def test_partial_push_with_leaves_untouched_layers_identical(fresh):
    """Loading only attention projections changes those layers and nothing else."""
    model, sync = _engine(SMALL_MOE)
    old = _snapshot(model)
    attn = [(n, t) for n, t in reference_state_dict(SMALL_MOE, 1).items() if ".self_attn." in n]
    report = sync.push_with(lambda: model.load_weights(attn))
    verdict = _layers_old_or_new(model, old, fresh(SMALL_MOE, 1))
    new_layers = sorted(layer for layer, kind in verdict.items() if kind == "new")
    assert new_layers == sorted(report.committed)
    assert all(".self_attn." in layer for layer in new_layers)
    assert len(new_layers) == 2 * SMALL_MOE.num_layers     # qkv_proj and o_proj per layer


def test_missing_shard_raises_naming_layer_and_piece(fresh):
    """A layer whose v shard never came keeps its old weights; the error names both."""
    model, sync = _engine(SMALL)
    old = _snapshot(model)
    items = [(n, t) for n, t in reference_state_dict(SMALL, 1).items()
             if n != "model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(loadfsm.PushError, match=r"qkv_proj\.weight\[v\]") as info:
        sync.push_with(lambda: model.load_weights(items))
    assert QKV0 in str(info.value) and info.value.layer == QKV0
    verdict = _layers_old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[QKV0] == "old" and QKV0 not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_exception_midway_rolls_back_and_retry_succeeds(config, fresh):
    """fn raising halfway leaves layers wholly old or new, lists committed; retry works."""
    model, sync = _engine(config, commit_bytes=0)
    old = _snapshot(model)
    items = list(reference_state_dict(config, 1).items())
    gone = ConnectionError("trainer went away")
    with pytest.raises(loadfsm.PushError, match="trainer went away") as info:
        sync.push_with(lambda: model.load_weights(_failing(items, len(items) // 2, gone)))
    assert info.value.__cause__ is gone
    verdict = _layers_old_or_new(model, old, fresh(config, 1))
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")
    assert info.value.committed and "old" in verdict.values()
    assert all(r.state is loadfsm.LayerState.FINALIZED and not r.staging
               for r in sync.session.plan.layers.values())
    assert sync.session.ledger.staging == 0
    sync.push_with(lambda: model.load_weights(items))
    _assert_equal_models(model, fresh(config, 1))


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_nan_shard_is_refused_before_anything_is_written(quant):
    """NaN in one shard: PushError caused by NonFiniteWeightError; the model stays old."""
    model, sync = _engine(SMALL, quant, atomic="model")
    old = _snapshot(model)
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(_seed1_with_nan_in_v1()))
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)
    assert info.value.__cause__.layer == "model.layers.1.self_attn.qkv_proj"
    assert info.value.committed == []
    _assert_equal_models(model, old)


def _seed1_with_nan_in_v1():
    """Seed-1 checkpoint tensors with one NaN in layer 1's v_proj."""
    state = reference_state_dict(SMALL, 1)
    state[V1] = state[V1].clone()
    state[V1][0, 0] = float("nan")
    return state.items()


def test_nan_shard_rolls_back_only_its_layer(fresh):
    """Per-layer atomicity: the NaN layer stays wholly old, the others are wholly new."""
    model, sync = _engine(SMALL, commit_bytes=0)
    old = _snapshot(model)
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(_seed1_with_nan_in_v1()))
    failed = "model.layers.1.self_attn.qkv_proj"
    verdict = _layers_old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[failed] == "old" and failed not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


def test_model_atomic_failure_commits_nothing():
    """With atomic='model' a failure at the last loader call leaves the whole model old."""
    model, sync = _engine(SMALL, atomic="model")
    old = _snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    with pytest.raises(loadfsm.PushError) as info:
        sync.push_with(lambda: model.load_weights(
            _failing(items, len(items) - 1, OSError("disk gone"))))
    assert info.value.committed == []
    _assert_equal_models(model, old)
    assert sync.session.ledger.staging == 0



def test_model_atomic_nan_in_push_rolls_back_every_layer():
    """push (shared with push_with), atomic='model': a NaN found at the end rolls all back."""
    model, sync = _loaded(LLAMA_SMALL, atomic="model")
    old = _snapshot(model)
    state = reference_state_dict(LLAMA_SMALL, 1)
    state["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(state.items())
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)
    assert all(r.state is loadfsm.LayerState.FINALIZED for r in sync.session.plan.layers.values())
    _assert_equal_models(model, old)
