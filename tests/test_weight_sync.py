"""RL weight sync: pushes re-quantize in place, bit-exact, atomic per layer, linear cost."""

from dataclasses import replace

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import loadfsm
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from checks import (addresses, assert_qkv_reloaded, assert_same_tensors, old_or_new, same,
                    snapshot)
from op_count import lines_run
from tiny_models import QKV0, SMALL, SMALL_MOE


def _load(config, state, quant="fp8"):
    model = build_model(config)
    report = loadfsm.load(model, state.items(), quant=quant, device="cpu")
    return model, report


@pytest.fixture(scope="module")
def fresh():
    """Fresh loads by (config, seed, quant), built once per module."""
    cache = {}

    def get(config, seed, quant="fp8"):
        key = (config, seed, quant)
        if key not in cache:
            cache[key] = snapshot(_load(config, reference_state_dict(config, seed), quant)[0])
        return cache[key]

    return get


def _engine(config, quant="fp8", **kwargs):
    """A loaded model and its sync, re-planned from the model (the contract form)."""
    model, _ = _load(config, reference_state_dict(config, 0), quant)
    return model, loadfsm.WeightSync(model, **kwargs)


@pytest.mark.parametrize("quant", ["fp8", "fp8-channel"])
def test_sync_on_the_load_session_equals_replanned(quant, fresh):
    """WeightSync(model, session=report) and WeightSync(model) push to the same result."""
    model, report = _load(SMALL_MOE, reference_state_dict(SMALL_MOE, 0), quant)
    loadfsm.WeightSync(model, session=report).push(reference_state_dict(SMALL_MOE, 1).items())
    assert_same_tensors(model.state_dict(), fresh(SMALL_MOE, 1, quant))


def test_replanned_sync_knows_the_original_plan():
    """Re-planning an FP8 model recovers its bf16 slots, pieces and quantization config."""
    model, report = _load(SMALL_MOE, reference_state_dict(SMALL_MOE, 0), "fp8-channel")
    sync = loadfsm.WeightSync(model)
    load_session = loadfsm.LoadSession(build_model(SMALL_MOE), quant="fp8-channel",
                                       device="cpu")     # what the load planned
    original = load_session.plan
    assert sync.session.quant == load_session.quant
    assert sync.session.plan.by_ckpt.keys() == original.by_ckpt.keys()
    for name, rec in original.layers.items():
        replanned = sync.session.plan.layers[name]
        assert {a: (s.shape, s.dtype) for a, s in replanned.slots.items()} == \
            {a: (s.shape, s.dtype) for a, s in rec.slots.items()}
        assert replanned.state is loadfsm.LayerState.FINALIZED


@pytest.mark.parametrize("config", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("quant", ["fp8", "fp8-channel"])
def test_push_matches_fresh_load(config, quant):
    """Load seed 0, push seed 1: every tensor bit-identical to a fresh load of seed 1."""
    model, sync = _engine(config, quant)
    new = reference_state_dict(config, 1)
    sync.push(new.items())
    assert_same_tensors(model.state_dict(), snapshot(_load(config, new, quant)[0]))


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-channel", "fp8-block"],
                         ids=["bf16", "fp8", "fp8-channel", "fp8-block"])
@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_keeps_every_address(config, quant):
    """No parameter or buffer changes data_ptr, shape, stride or dtype across a push."""
    model, sync = _engine(config, quant)
    before = addresses(model)
    sync.push(reference_state_dict(config, 1).items())
    assert addresses(model) == before


def test_push_leaves_non_persistent_buffers_untouched():
    """Rotary cos/sin tables keep their values (no checkpoint tensor feeds them)."""
    model, sync = _engine(SMALL)
    rotary = {n: b.clone() for n, b in model.named_buffers() if "cached" in n}
    sync.push(reference_state_dict(SMALL, 1).items())
    assert rotary and all(torch.equal(rotary[n], b) for n, b in model.named_buffers()
                          if n in rotary)


@pytest.mark.parametrize("config", [SMALL, SMALL_MOE], ids=["dense", "moe"])
def test_push_by_parameter_names_matches_fresh_load(config, fresh):
    """A trainer's named_parameters() (fused qkv, stacked experts) give the fresh load."""
    model, sync = _engine(config)
    trainer = load_reference_model(config, seed=1)
    report = sync.push(trainer.named_parameters())
    assert_same_tensors(model.state_dict(), fresh(config, 1))
    assert report.layers_updated == len(sync.session.plan.layers)


EDGE_CASES = {"tied": replace(SMALL, tie_embeddings=True),
              "padded": replace(SMALL, vocab_size=250, pad_vocab_to=64),
              "tied-padded": replace(SMALL, vocab_size=250, pad_vocab_to=64,
                                     tie_embeddings=True),
              "kv-scales": replace(SMALL, kv_cache_scales=True)}


@pytest.mark.parametrize("naming", ["checkpoint", "parameters"])
@pytest.mark.parametrize("config", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_push_handles_tied_padded_and_kv_scales(config, naming, fresh):
    """Tied embeddings, padded vocab rows and kv scales sync bit-exactly by either naming."""
    model, sync = _engine(config)
    if naming == "checkpoint":
        sync.push(reference_state_dict(config, 1).items())
    else:
        sync.push(load_reference_model(config, seed=1).named_parameters())
    assert_same_tensors(model.state_dict(), fresh(config, 1))


def test_pushed_layer_transition_sequence_is_exact():
    """A pushed fused layer logs reload, arrive x3, complete, quantize, finalize."""
    model, report = _load(SMALL, reference_state_dict(SMALL, 0))
    sync = loadfsm.WeightSync(model, session=report, trace=True)
    with capture_logs() as logs:
        sync.push(reference_state_dict(SMALL, 1).items())
    assert_qkv_reloaded(logs, QKV0)


def test_partial_push_leaves_untouched_layers_identical(fresh):
    """Pushing only attention projections changes those layers and nothing else."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    new_state = reference_state_dict(SMALL, 1)
    attn = {n: t for n, t in new_state.items() if ".self_attn." in n}
    report = sync.push(attn.items())
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    new_layers = sorted(layer for layer, kind in verdict.items() if kind == "new")
    assert new_layers == sorted(report.committed)
    assert all(".self_attn." in layer for layer in new_layers)
    assert len(new_layers) == 2 * SMALL.num_layers        # qkv_proj and o_proj per layer


def test_missing_piece_raises_naming_layer_and_pieces(fresh):
    """A touched layer without its v_proj keeps its old weights; the error names both."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    state = reference_state_dict(SMALL, 1)
    del state["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(loadfsm.PushError, match="v_proj") as info:
        sync.push(state.items())
    assert QKV0 in str(info.value) and info.value.layer == QKV0
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[QKV0] == "old" and QKV0 not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


def test_wrong_shape_mid_push_rolls_back_and_retry_succeeds(fresh):
    """A bad tensor halfway: every layer wholly old or new, committed listed, retry works."""
    model, sync = _engine(SMALL, commit_bytes=0)
    old = snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    middle = len(items) // 2
    bad = items[:middle] + [(items[middle][0], torch.zeros(3, 3))] + items[middle + 1:]
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(bad)
    assert isinstance(info.value.__cause__, loadfsm.ShapeMismatchError)
    assert info.value.tensor == items[middle][0]
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")
    assert info.value.committed and "old" in verdict.values()
    sync.push(items)
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))


def test_iterator_raising_midway_rolls_back_and_retry_succeeds(fresh):
    """The trainer's iterator raising halfway leaves layers wholly old or new; retry works."""
    model, sync = _engine(SMALL, commit_bytes=0)
    old = snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())

    def dropped_connection():
        yield from items[: len(items) // 2]
        raise ConnectionError("trainer went away")

    with pytest.raises(loadfsm.PushError, match="trainer went away") as info:
        sync.push(dropped_connection())
    assert isinstance(info.value.__cause__, ConnectionError)
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")
    assert all(r.state is loadfsm.LayerState.FINALIZED and not r.staging
               for r in sync.session.plan.layers.values())
    assert sync.session.ledger.staging == 0
    sync.push(items)
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))


def _push_nan_into_qkv0(sync):
    """Push seed 1 with one NaN in layer 0's k_proj: it fails as non-finite."""
    state = reference_state_dict(SMALL, 1)
    state["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(state.items())
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)


def test_non_finite_push_rolls_back_its_layer():
    """A NaN weight is refused before anything is committed into that layer."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    _push_nan_into_qkv0(sync)
    assert same(model.state_dict()[f"{QKV0}.weight"], old[f"{QKV0}.weight"])


def test_model_atomic_failure_commits_nothing():
    """With atomic='model' a failure at the last tensor leaves the whole model old."""
    model, sync = _engine(SMALL, atomic="model")
    old = snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    items[-1] = (items[-1][0], torch.zeros(1))
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(items)
    assert info.value.committed == []
    assert_same_tensors(model.state_dict(), old)
    assert sync.session.ledger.staging == 0


def test_model_atomic_nan_rolls_back_every_layer():
    """With atomic='model' a NaN found at the end rolls every layer back."""
    model, sync = _engine(SMALL, atomic="model")
    old = snapshot(model)
    _push_nan_into_qkv0(sync)
    assert all(r.state is loadfsm.LayerState.FINALIZED for r in sync.session.plan.layers.values())
    assert_same_tensors(model.state_dict(), old)


def test_model_atomic_push_matches_fresh_load(fresh):
    """With atomic='model' a good push commits every touched layer at the end."""
    model, sync = _engine(SMALL, atomic="model")
    report = sync.push(reference_state_dict(SMALL, 1).items())
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))
    assert report.layers_updated == len(report.committed) > 0


def test_dummy_engine_then_full_push_equals_real_load(fresh):
    """An engine started with dummy weights, after one full push, equals a real load."""
    model = build_model(SMALL)
    report = loadfsm.load(model, None, load_format="dummy", quant="fp8", device="cpu")
    loadfsm.WeightSync(model, session=report).push(reference_state_dict(SMALL, 1).items())
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))


def test_sync_report_figures():
    """Bytes received add up; committing each layer at once holds about one layer extra."""
    model, sync = _engine(SMALL, commit_bytes=0)
    state = reference_state_dict(SMALL, 1)
    report = sync.push(state.items())
    assert report.bytes_received == sum(t.numel() * t.element_size() for t in state.values())
    assert report.tensors_received == len(state)
    largest = max(r.final_bytes for r in sync.session.plan.layers.values())
    biggest_staging = max(t.numel() * 2 for t in state.values()) * 3   # fused qkv, say
    assert 0 < report.peak_extra_bytes <= biggest_staging + largest
    assert report.seconds > 0 and report.layers_updated == len(report.committed)
    assert sync.session.ledger.staging == 0


def test_unknown_name_raises_and_changes_nothing():
    """A name that is neither a checkpoint tensor nor a parameter is refused."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    with pytest.raises(loadfsm.PushError, match="nonsense.weight"):
        sync.push([("nonsense.weight", torch.zeros(2))])
    assert_same_tensors(model.state_dict(), old)


def test_sync_refuses_a_session_of_another_model():
    """WeightSync needs the session that loaded this very model."""
    model, report = _load(SMALL, reference_state_dict(SMALL, 0))
    with pytest.raises(ValueError, match="did not load"):
        loadfsm.WeightSync(build_model(SMALL), session=report)
    with pytest.raises(ValueError, match="did not load"):
        loadfsm.WeightSync(model, session=loadfsm.LoadSession(build_model(SMALL)))


class ManyLinearsModel(nn.Module):
    """Many small linears: one layer each, to count per-layer bookkeeping."""

    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(n))


def _many(n):
    """A sync over a loaded ``ManyLinearsModel(n)`` that has pushed once, and its weights."""
    with torch.device("meta"):
        model = ManyLinearsModel(n)
    state = {f"layers.{i}.weight": torch.randn(16, 16, dtype=torch.bfloat16) for i in range(n)}
    report = loadfsm.load(model, state.items(), quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model, session=report)
    sync.push(state.items())            # what a first push sets up once is not per layer
    return sync, list(state.items())


def test_push_cost_is_linear_in_layers_pushed():
    """Pushing k of a model's n layers costs about a*k + b*n: no k*n term (no scan of the
    model per pushed tensor) and nothing quadratic in k. Work is counted in Python lines,
    not timed (benchmarks/scaling_bench.py times it)."""
    lines = {}
    for n in (64, 512):
        sync, items = _many(n)
        for k in sorted({8, 64, n}):
            with lines_run() as work:
                sync.push(items[:k])
            lines[n, k] = work.lines
    per_pushed = (lines[512, 64] - lines[512, 8]) / 56
    # The 448 layers the larger model adds cost a push the same for 8 or 64 pushed layers,
    # and far less than pushing them would.
    idle_8, idle_64 = lines[512, 8] - lines[64, 8], lines[512, 64] - lines[64, 64]
    assert abs(idle_64 - idle_8) < 0.05 * 56 * per_pushed, (idle_8, idle_64, per_pushed)
    assert idle_8 < 448 * per_pushed / 10, (idle_8, per_pushed)
    assert (lines[512, 512] - lines[512, 64]) / 448 < 1.25 * per_pushed, lines


def test_push_never_keeps_or_changes_the_trainers_tensors():
    """Whole-parameter pushes read the trainer's tensors without aliasing or writing them."""
    model, sync = _engine(SMALL, quant="fp8")
    trainer = load_reference_model(SMALL, seed=1)
    before = {n: p.detach().clone() for n, p in trainer.named_parameters()}
    sync.push(trainer.named_parameters())
    trainer_ptrs = {p.data_ptr() for p in trainer.parameters()}
    assert not trainer_ptrs & {t.data_ptr() for t in model.state_dict().values()}
    assert all(torch.equal(before[n], p) for n, p in trainer.named_parameters())
    assert sync.session.ledger.staging == 0


@pytest.mark.parametrize("budget", [0, 100_000, 1 << 40], ids=["per-layer", "100KB", "push"])
def test_commit_budget_bounds_extra_memory(budget, fresh):
    """Held (unverified) results never exceed commit_bytes + one layer; results are exact."""
    model, sync = _engine(SMALL, commit_bytes=budget)
    state = reference_state_dict(SMALL, 1)
    report = sync.push(state.items())
    largest = max(r.final_bytes for r in sync.session.plan.layers.values())
    biggest_staging = max(t.numel() * 2 for t in state.values()) * 3
    held_total = sum(r.final_bytes for r in sync.session.plan.layers.values())
    bound = min(budget + largest, held_total) + biggest_staging + largest
    assert report.peak_extra_bytes <= bound
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))


def test_nan_in_a_held_batch_commits_none_of_it():
    """A NaN found at verification leaves every layer of the batch old; the rest is exact."""
    model, sync = _engine(SMALL, commit_bytes=1 << 40)
    old = snapshot(model)
    state = reference_state_dict(SMALL, 1)
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(state.items())
    assert isinstance(info.value.__cause__, loadfsm.NonFiniteWeightError)
    assert name in str(info.value.__cause__) and info.value.committed == []
    assert_same_tensors(model.state_dict(), old)


def test_commit_checks_every_tensor_before_copying(monkeypatch, fresh):
    """A result that cannot fit its live tensor fails the commit before any copy."""
    from loadfsm.handlers.fp8 import Fp8Handler
    model, sync = _engine(SMALL, commit_bytes=0)
    old = snapshot(model)
    real = Fp8Handler.quantize

    def bad_scale(self, rec, config):
        results = real(self, rec, config)
        results["weight_scale"] = results["weight_scale"].reshape(1, -1).repeat(1, 2)
        return results

    monkeypatch.setattr(Fp8Handler, "quantize", bad_scale)
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(reference_state_dict(SMALL, 1).items())
    assert isinstance(info.value.__cause__, loadfsm.ShapeMismatchError)
    failed = info.value.__cause__.layer
    verdict = old_or_new(model, old, fresh(SMALL, 1))
    assert verdict[failed] == "old" and failed not in info.value.committed
    assert sorted(info.value.committed) == sorted(k for k, v in verdict.items() if v == "new")


def test_replanning_refuses_fp8_parameters_it_cannot_explain():
    """FP8 tensors in a module without full_precision_slots make re-planning refuse."""
    model, _ = _load(SMALL, reference_state_dict(SMALL, 0), None)
    norm = model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().to(torch.float8_e4m3fn),
                                     requires_grad=False)
    with pytest.raises(ValueError, match="full_precision_slots"):
        loadfsm.WeightSync(model)


@pytest.mark.parametrize("bad", [("w", "not a tensor"), ("w",), (3, torch.zeros(1)),
                                 ("w", torch.empty(2, device="meta"))],
                         ids=["value", "single", "name", "meta"])
def test_bad_item_mid_push_is_typed_rolls_back_and_retry_succeeds(bad, fresh):
    """A malformed (name, tensor) item halfway raises PushError from BadWeightItemError;
    every layer is wholly old or new and a retry succeeds."""
    model, sync = _engine(SMALL, commit_bytes=0)
    old = snapshot(model)
    items = list(reference_state_dict(SMALL, 1).items())
    middle = len(items) // 2
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(items[:middle] + [bad] + items[middle:])
    assert isinstance(info.value.__cause__, loadfsm.BadWeightItemError)
    old_or_new(model, old, fresh(SMALL, 1))
    sync.push(items)
    assert_same_tensors(model.state_dict(), fresh(SMALL, 1))


def test_push_of_a_mapping_is_refused_before_anything_changes():
    """A dict (not its .items()) is refused at once with BadWeightItemError."""
    model, sync = _engine(SMALL)
    old = snapshot(model)
    with pytest.raises(loadfsm.BadWeightItemError, match=r"\.items\(\)"):
        sync.push(reference_state_dict(SMALL, 1))
    assert_same_tensors(model.state_dict(), old)


class RouterWithBiasBuffer(nn.Module):
    """A router whose persistent buffer is trained outside the optimizer (DeepSeek-V3's
    ``e_score_correction_bias``): a trainer's named_parameters() does not carry it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(8, 16))
        self.register_buffer("e_score_correction_bias", torch.empty(8))


class BufferedRouterModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32, bias=False)
        self.gate = RouterWithBiasBuffer()


def _router_state(seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {**dict(BufferedRouterModel().named_parameters()),
                  **dict(BufferedRouterModel().named_buffers())}
    return {name: torch.randn(t.shape, generator=gen).to(torch.bfloat16)
            for name, t in shapes.items()}


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_push_of_parameters_only_keeps_the_live_buffers(quant):
    """Pushing named_parameters() alone updates every parameter and keeps the touched
    layer's unpushed persistent buffer as it was, equal to a fresh load of that mix."""
    with torch.device("meta"):
        model = BufferedRouterModel().to(torch.bfloat16)
    first, second = _router_state(0), _router_state(1)
    loadfsm.load(model, first.items(), quant=quant, device="cpu")
    before = addresses(model)
    params_only = {k: v for k, v in second.items() if k != "gate.e_score_correction_bias"}
    with capture_logs() as events:
        loadfsm.WeightSync(model, trace=True).push(params_only.items())
    with torch.device("meta"):
        expected = BufferedRouterModel().to(torch.bfloat16)
    loadfsm.load(expected, {**params_only,
                            "gate.e_score_correction_bias": first["gate.e_score_correction_bias"]
                            }.items(), quant=quant, device="cpu")
    assert_same_tensors(model.state_dict(), expected.state_dict())
    assert addresses(model) == before
    kept = [(e["layer"], e["pieces"]) for e in events if e["event"] == "buffers_kept"]
    assert kept == [("gate", ["gate.e_score_correction_bias"])]


def test_push_missing_a_parameter_still_fails_when_buffers_are_kept():
    """Only buffers are kept: a touched layer missing a parameter still rolls back."""
    with torch.device("meta"):
        model = BufferedRouterModel().to(torch.bfloat16)
    loadfsm.load(model, _router_state(0).items(), device="cpu")
    old = snapshot(model)
    with pytest.raises(loadfsm.PushError, match="gate.weight"):
        loadfsm.WeightSync(model).push([("gate.e_score_correction_bias",
                                         _router_state(1)["gate.e_score_correction_bias"])])
    assert_same_tensors(model.state_dict(), old)
