"""Property tests: random arrival orders, partial pushes and fault positions (an
exception from the source, a Ctrl-C or exception between any two tensor copies, commit
copies included, a trace file that fills up). After each, every layer is wholly old or
wholly new, the records agree with the tensors, nothing moved, and a retry succeeds."""

from contextlib import nullcontext

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import loadfsm
import loadfsm.loading.finiteness
from loadfsm.testing import build_model, reference_state_dict
from checks import addresses, layer_verdicts, same, snapshot
from faults import CopyFault, full_disk
from tiny_models import SMALL, SMALL_MOE

SEEDS = (0, 1, 2)
FAULTS = ("none", "iterator", "raise", "sigint", "keyboard", "sink")
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _fresh(config, seed):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, seed).items(), quant="fp8", device="cpu")
    return snapshot(model)


@pytest.fixture(scope="module", params=[SMALL, SMALL_MOE], ids=["dense", "moe"])
def loaded(request):
    """A loaded FP8 model, its pushes' weights and their fresh loads, by seed."""
    config = request.param
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant="fp8", device="cpu")
    weights = {seed: list(reference_state_dict(config, seed).items()) for seed in SEEDS}
    return config, model, weights, {seed: _fresh(config, seed) for seed in SEEDS}


def _source(items, fault, at):
    """The pushed (or loaded) items; with ``fault="iterator"`` it raises before item ``at``."""
    for i, item in enumerate(items, 1):
        if fault == "iterator" and i == at:
            raise ConnectionError("trainer went away")
        yield item


def _fault(fault, at):
    if fault in ("raise", "sigint", "keyboard"):
        return CopyFault(fault, at)
    return nullcontext()


@PROPERTY
@given(data=st.data())
def test_push_under_faults_leaves_every_layer_whole(loaded, data):
    """Random partial pushes in random order with one random fault: layers whole, records
    FINALIZED and truthful, addresses kept, the trace says what committed, retry works."""
    config, model, weights, fresh = loaded
    seed = data.draw(st.sampled_from(SEEDS), label="seed")
    items = weights[seed]
    order = data.draw(st.permutations(range(len(items))), label="order")
    keep = data.draw(st.integers(1, len(items)), label="pushed")
    fault = data.draw(st.sampled_from(FAULTS), label="fault")
    at = data.draw(st.integers(1, 80), label="at")
    atomic = data.draw(st.sampled_from(["layer", "model"]), label="atomic")
    commit_bytes = data.draw(st.sampled_from([0, 4096, 1 << 30]), label="commit_bytes")
    pushed = [items[i] for i in order[:keep]]
    event(f"fault={fault}")

    old, where = snapshot(model), addresses(model)
    with full_disk(at) if fault == "sink" else nullcontext():
        sync = loadfsm.WeightSync(model, atomic=atomic, commit_bytes=commit_bytes,
                                  trace="t.jsonl" if fault == "sink" else True)
    committed, interrupted, raised = None, False, False
    with capture_logs() as events:
        try:
            with _fault(fault, at):
                committed = sync.push(_source(pushed, fault, at)).committed
        except loadfsm.PushError as exc:
            committed, raised = exc.committed, True
        except KeyboardInterrupt:
            interrupted = True
    assert interrupted <= (fault in ("sigint", "keyboard"))
    event(f"outcome={'interrupt' if interrupted else 'error' if raised else 'ok'}")
    if fault == "sink" and keep == len(items):
        assert committed is not None and len(committed) == _touched(sync, items)
    failed = [e for e in events if e["event"] == "push_failed"]
    if fault != "sink":
        assert len(failed) == (interrupted or raised)
        assert raised or interrupted or len(committed) == _touched(sync, pushed)
    if interrupted:
        committed = failed[0]["committed"]

    verdicts = layer_verdicts(model, old, fresh[seed])
    new = {layer for layer, kinds in verdicts.items() if kinds == {"new"}}
    either = {layer for layer, kinds in verdicts.items() if kinds == {"old", "new"}}
    assert new <= set(committed) <= new | either
    assert addresses(model) == where
    session = sync.session
    assert all(rec.state is loadfsm.LayerState.FINALIZED and not rec.staging
               and not rec.results for rec in session.plan.layers.values())
    assert session.ledger.staging == 0 and session.batch.held == []

    sync.push(items)                                                  # the retry
    assert layer_verdicts(model, fresh[seed], fresh[seed])
    assert all(same(t, fresh[seed][n]) for n, t in model.state_dict().items())
    assert addresses(model) == where


def _touched(sync, pushed):
    """How many layers ``pushed`` names."""
    routes = sync._routes
    return len({routes.resolve(name, tensor.shape).rec.name for name, tensor in pushed})


LOAD_FAULTS = ("none", "iterator", "nan", "raise", "sigint", "keyboard", "sink")


@PROPERTY
@given(data=st.data())
def test_first_load_under_faults_installs_only_whole_verified_layers(loaded, data):
    """A first load in random order with one random fault: each layer is either still on
    meta or bit-identical to a fresh load (never NaN, never half); loading again into the
    same model gives the fresh load."""
    config, _, weights, fresh = loaded
    items = weights[0]
    order = data.draw(st.permutations(range(len(items))), label="order")
    fault = data.draw(st.sampled_from(LOAD_FAULTS), label="fault")
    at = data.draw(st.integers(1, 80), label="at")
    commit_bytes = data.draw(st.sampled_from([0, 4096, 1 << 30]), label="commit_bytes")
    arrivals = [items[i] for i in order]
    event(f"fault={fault}")
    if fault == "nan":
        i = at % len(arrivals)
        name, tensor = arrivals[i]
        arrivals[i] = (name, tensor.clone().view(-1).index_fill_(0, torch.tensor([0]),
                                                                 float("nan")).view_as(tensor))
    model = build_model(config)
    outcome = "ok"
    with capture_logs() as events, _commit_bytes(commit_bytes):
        try:
            with _fault(fault, at), full_disk(at) if fault == "sink" else nullcontext():
                loadfsm.load(model, _source(arrivals, fault, at), quant="fp8", device="cpu",
                             trace="t.jsonl" if fault == "sink" else True)
        except (loadfsm.LoadError, ConnectionError, RuntimeError):
            outcome = "error"
        except KeyboardInterrupt:
            outcome = "interrupt"
    event(f"outcome={outcome}")
    if fault in ("none", "sink"):
        assert outcome == "ok"
    if fault == "nan":
        assert outcome == "error"
    if fault != "sink":       # a full trace file: only its one warning reaches the logger
        names = {e["event"] for e in events}
        assert ("load_failed" in names) == (outcome != "ok")
        assert ("load_complete" in names) == (outcome == "ok")

    state = model.state_dict()
    for layer in {name.rpartition(".")[0] for name in state}:
        mine = {n: t for n, t in state.items() if n.rpartition(".")[0] == layer}
        if all(t.is_meta for t in mine.values()):
            continue
        assert all(same(t, fresh[0][n]) for n, t in mine.items()), layer

    loadfsm.load(model, items, quant="fp8", device="cpu")             # the retry
    assert all(same(t, fresh[0][n]) for n, t in model.state_dict().items())


def _commit_bytes(n):
    """Verify (and install) every ``n`` bytes of a first load."""
    patch = pytest.MonkeyPatch()
    patch.setattr(loadfsm.loading.finiteness, "COMMIT_BYTES", n)
    return _Undo(patch)


class _Undo:
    def __init__(self, patch):
        self.patch = patch

    def __enter__(self):
        return self.patch

    def __exit__(self, *exc):
        self.patch.undo()
