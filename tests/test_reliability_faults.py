"""One test per fault kind of the reliability battery: each failed before the fix."""

import signal
import threading

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import loadfsm
from loadfsm.atomic import deferred_interrupts
from loadfsm.errors import ConcurrentPushError, ModelStateError
from loadfsm.reload.transaction import ReloadTransaction
from loadfsm.testing import build_model, reference_state_dict
from loadfsm.quant.linear import Fp8Linear
from checks import same, snapshot
from faults import CopyFault, full_disk
from tiny_models import SMALL

O_PROJ = "model.layers.0.self_attn.o_proj"


def _loaded(seed=0, quant="fp8"):
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, seed).items(), quant=quant, device="cpu")
    return model


def _o_proj_push(seed=1):
    name = f"{O_PROJ}.weight"
    return [(name, reference_state_dict(SMALL, seed)[name])]


def _between_commit_copies(model, kind):
    """Injects ``kind`` right before the second copy into o_proj's live tensors: between
    its weight and scale copies, whichever goes first."""
    module = model.get_submodule(O_PROJ)
    return CopyFault(kind, 2, into={module.weight.data_ptr(), module.weight_scale.data_ptr()})


def test_interrupt_between_weight_and_scale_copies_commits_the_whole_layer():
    """A Ctrl-C between an FP8 commit's copies lands after the layer is wholly new and
    FINALIZED, and the trace says it committed."""
    model, fresh = _loaded(0), snapshot(_loaded(1))
    sync = loadfsm.WeightSync(model, trace=True)
    with capture_logs() as events, pytest.raises(KeyboardInterrupt):
        with _between_commit_copies(model, "sigint"):
            sync.push(_o_proj_push())
    for attr in ("weight", "weight_scale"):
        assert same(getattr(model.get_submodule(O_PROJ), attr), fresh[f"{O_PROJ}.{attr}"])
    assert sync.session.plan.layers[O_PROJ].state is loadfsm.LayerState.FINALIZED
    failed = [e for e in events if e["event"] == "push_failed"]
    assert failed[0]["committed"] == [O_PROJ] and failed[0]["error"] == "KeyboardInterrupt"


@pytest.mark.parametrize("kind", ["keyboard", "raise"])
def test_exception_between_commit_copies_restores_the_old_tensors(kind):
    """An exception between an FP8 commit's copies (as off the main thread) puts the old
    weight and scale back; the layer is recorded as rolled back, and it is."""
    model = _loaded(0)
    old = snapshot(model)
    sync = loadfsm.WeightSync(model)
    with pytest.raises((KeyboardInterrupt, loadfsm.PushError)):
        with _between_commit_copies(model, kind):
            sync.push(_o_proj_push())
    assert all(same(t, old[n]) for n, t in model.state_dict().items())
    sync.push(_o_proj_push())
    assert same(model.get_submodule(O_PROJ).weight, snapshot(_loaded(1))[f"{O_PROJ}.weight"])


def test_second_interrupt_during_rollback_leaves_the_sync_usable(monkeypatch):
    """A second Ctrl-C arriving while a failed push rolls back: later pushes still work."""
    model = _loaded(0)
    sync = loadfsm.WeightSync(model)
    items = list(reference_state_dict(SMALL, 1).items())
    real_rollback, calls = ReloadTransaction.rollback, []

    def rollback_then_ctrl_c(self, rec):
        calls.append(rec.name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)   # the user presses Ctrl-C again
        real_rollback(self, rec)

    def interrupted():
        yield from items[:-3]
        raise KeyboardInterrupt

    monkeypatch.setattr(ReloadTransaction, "rollback", rollback_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        sync.push(interrupted())
    monkeypatch.setattr(ReloadTransaction, "rollback", real_rollback)
    sync.push(items)
    assert all(same(t, v) for t, v in zip(model.state_dict().values(),
                                             snapshot(_loaded(1)).values()))


def test_second_push_into_the_same_model_is_refused_at_once():
    """While one WeightSync pushes, another on the same model gets ConcurrentPushError
    and changes nothing; the first push completes whole."""
    model = _loaded(0)
    first, second = loadfsm.WeightSync(model), loadfsm.WeightSync(model)
    inside, release, errors = threading.Event(), threading.Event(), []
    items = list(reference_state_dict(SMALL, 1).items())

    def slow():
        yield from items[:3]
        inside.set()
        release.wait(timeout=60)
        yield from items[3:]

    worker = threading.Thread(target=lambda: first.push(slow()))
    worker.start()
    inside.wait(timeout=60)
    try:
        with pytest.raises(ConcurrentPushError) as info:
            second.push(reference_state_dict(SMALL, 2).items())
    finally:
        release.set()
        worker.join()
    assert info.value.committed == [] and isinstance(info.value, loadfsm.PushError)
    assert all(same(t, v) for t, v in zip(model.state_dict().values(),
                                             snapshot(_loaded(1)).values()))


def test_concurrent_pushes_from_threads_never_tear():
    """Two threads, two WeightSyncs, one model, many pushes (waiting for their turn):
    after each, the model is wholly one of the two weight sets."""
    model = _loaded(0)
    states = {seed: list(reference_state_dict(SMALL, seed).items()) for seed in (1, 2)}
    fresh = {seed: snapshot(_loaded(seed)) for seed in (1, 2)}
    syncs = {seed: loadfsm.WeightSync(model, wait=True) for seed in (1, 2)}
    errors = []

    def pusher(seed):
        try:
            for _ in range(12):
                syncs[seed].push(states[seed])
        except BaseException as exc:       # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = snapshot(model)
    assert any(all(same(final[n], ref[n]) for n in final) for ref in fresh.values())


def test_loading_without_quant_after_fp8_is_refused():
    """load(fp8) then load(quant=None) raises ModelStateError instead of putting bf16
    weights into FP8 modules beside their old scales."""
    model = _loaded(0)
    with pytest.raises(ModelStateError, match="Fp8Linear"):
        loadfsm.load(model, reference_state_dict(SMALL, 1).items(), device="cpu")
    assert isinstance(model.get_submodule(O_PROJ), Fp8Linear)


def test_loading_fp8_again_with_another_granularity_replaces_the_modules():
    """load(fp8) then load(fp8-channel) gives exactly a fresh fp8-channel load."""
    model = _loaded(0)
    loadfsm.load(model, reference_state_dict(SMALL, 1).items(), quant="fp8-channel",
                 device="cpu")
    fresh = snapshot(_loaded(1, "fp8-channel"))
    assert all(same(t, fresh[n]) for n, t in model.state_dict().items())


class SharedLinearModel(nn.Module):
    """One linear registered under two names (``first`` and ``second``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 64, bias=False)
        self.second = self.first


def test_module_under_two_names_gets_its_fp8_module_under_both():
    """An FP8 load swaps a shared module under every name it is registered at."""
    with torch.device("meta"):
        model = SharedLinearModel().to(torch.bfloat16)
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    loadfsm.load(model, [("first.weight", weight)], quant="fp8", device="cpu")
    assert isinstance(model.first, Fp8Linear) and model.second is model.first


def test_nan_found_at_the_end_of_a_first_load_installs_no_layer():
    """NaN found by the final verification: no layer of the model holds the bad data."""
    model = build_model(SMALL)
    state = reference_state_dict(SMALL, 0)
    name = "model.norm.weight"
    state[name] = torch.full_like(state[name], float("nan"))
    with capture_logs() as events, pytest.raises(loadfsm.NonFiniteWeightError):
        loadfsm.load(model, state.items(), quant="fp8", device="cpu", trace=True)
    assert model.model.norm.weight.is_meta
    assert not any(torch.isnan(t).any() for t in model.state_dict().values() if not t.is_meta)
    failed = [e for e in events if e["event"] == "load_failed"]
    assert failed[0]["error"] == "NonFiniteWeightError" and failed[0]["tensor"] == name
    abandoned = [e for e in events if e["event"] == "layer_transition"
                 and e["trigger"] == "abandon"]
    assert {e["layer"] for e in abandoned} >= {"model.norm"}


def test_full_disk_trace_mid_push_commits_warns_once_and_later_pushes_work(tmp_path):
    """A trace file that fills up mid-push: the push commits, one trace_sink_failed
    warning, and the same WeightSync takes later pushes."""
    model = _loaded(0)
    with full_disk(5):
        sync = loadfsm.WeightSync(model, trace=tmp_path / "t.jsonl")
    with capture_logs() as events:
        report = sync.push(reference_state_dict(SMALL, 1).items())
        sync.push(reference_state_dict(SMALL, 2).items())
    assert report.layers_updated == 15
    assert [e["event"] for e in events if e["log_level"] == "warning"] == ["trace_sink_failed"]
    fresh = snapshot(_loaded(2))
    assert all(same(t, fresh[n]) for n, t in model.state_dict().items())


def test_failed_push_traces_push_failed_and_the_rollbacks():
    """A push that fails traces its rollbacks, then push_failed with the error's fields."""
    model = _loaded(0)
    sync = loadfsm.WeightSync(model, trace=True)
    state = reference_state_dict(SMALL, 1)
    del state["model.layers.0.self_attn.v_proj.weight"]
    with capture_logs() as events, pytest.raises(loadfsm.PushError):
        sync.push(state.items())
    names = [e["event"] for e in events]
    failed = events[names.index("push_failed")]
    assert {k: failed[k] for k in ("error", "layer", "tensor", "file")} == {
        "error": "PushError", "layer": "model.layers.0.self_attn.qkv_proj", "tensor": None,
        "file": None}
    assert "v_proj" in failed["message"] and isinstance(failed["committed"], list)
    rollbacks = [i for i, e in enumerate(events) if e.get("trigger") == "rollback"]
    assert rollbacks and max(rollbacks) < names.index("push_failed")


def test_fp8_underflow_warns_naming_tensor_and_layer():
    """A weight whose scale is set by one far outlier flushes most values to zero in FP8:
    one fp8_underflow warning names the tensor, the layer and the fraction."""
    model = build_model(SMALL)
    state = reference_state_dict(SMALL, 0)
    name = f"{O_PROJ}.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = 1e4
    with capture_logs() as events:
        loadfsm.load(model, state.items(), quant="fp8", device="cpu")
    warned = [e for e in events if e["event"] == "fp8_underflow"]
    assert len(warned) == 1
    assert warned[0]["tensor"] == name and warned[0]["layer"] == O_PROJ
    assert 0.5 < warned[0]["fraction"] <= 1


def test_normal_weights_do_not_warn_of_underflow():
    """Ordinary weights lose almost nothing to FP8 zero: no underflow warning."""
    with capture_logs() as events:
        _loaded(0)
    assert not [e for e in events if e["event"] == "fp8_underflow"]


def test_held_interrupt_reaches_the_applications_own_handler_once():
    """A SIGINT inside a held section reaches the application's handler once, at its end."""
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("numel", [1, 1000, (1 << 18) + 7, (1 << 22) + 3],
                         ids=["one", "small", "chunk-edge", "many-chunks"])
def test_underflow_count_is_exact_across_chunks(numel):
    """The chunked count of FP8-flushed values equals the direct count, -0 included."""
    from loadfsm.quant.config import Fp8Config
    from loadfsm.quant.fp8 import flushed_to_zero, quantize_fp8
    gen = torch.Generator().manual_seed(numel)
    w = (torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen) ** 8)
    w = w.to(torch.bfloat16).reshape(1, numel)
    w[0, 0] = -1e4 if numel > 1 else 0.0
    q, _ = quantize_fp8(w, Fp8Config("tensor"))
    flushed, nonzero = flushed_to_zero(w, q)
    zero_q = (q.view(torch.uint8) & 0x7F) == 0
    assert nonzero.item() == int((w != 0).sum())
    assert flushed.item() == int(((w != 0) & zero_q).sum())


@pytest.mark.parametrize("shape", [(7,), (300, 64), (4, 96, 32)], ids=["vector", "matrix", "experts"])
def test_underflow_sample_pairs_the_same_rows(shape):
    """The sampled rows of a weight and of its FP8 form (also stored transposed) are the
    same elements, at most the limit of them."""
    from loadfsm.quant.fp8 import sample_rows
    w = torch.randn(shape)
    q = w.to(torch.float8_e4m3fn)
    for stored in (q, q.transpose(-1, -2).contiguous().transpose(-1, -2) if q.dim() > 1 else q):
        w_rows, q_rows = sample_rows(w, stored, 1000)
        assert w_rows.numel() <= max(1000, shape[-1])
        assert torch.equal(w_rows.to(torch.float8_e4m3fn).float(), q_rows.float())
    if q.dim() > 1:       # a kernel layout [K, N]: the sample is taken in w's order
        w_rows, q_rows = sample_rows(w, q.transpose(-1, -2), 1000)
        assert torch.equal(w_rows.to(torch.float8_e4m3fn).float(), q_rows.float())


def test_underflow_is_not_counted_on_pushes():
    """A push, the RL hot path, counts no underflow: the first load already checked."""
    model = build_model(SMALL)
    state = reference_state_dict(SMALL, 0)
    loadfsm.load(model, state.items(), quant="fp8", device="cpu")
    state[f"{O_PROJ}.weight"] = state[f"{O_PROJ}.weight"].clone()
    state[f"{O_PROJ}.weight"][0, 0] = 1e4
    with capture_logs() as events:
        loadfsm.WeightSync(model).push(state.items())
    assert not [e for e in events if e["event"] == "fp8_underflow"]
