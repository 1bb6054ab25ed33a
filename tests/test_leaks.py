"""Nothing outlives a load or a push: no session, record or staging tensor, and no
reference cycle (everything below is freed with the garbage collector switched off)."""

import gc
import weakref

import pytest

import loadfsm
from loadfsm.api import run
from loadfsm.handlers.base import Handler
from loadfsm.testing import build_model, reference_state_dict
from loadfsm.sources.base import IteratorSource
from tiny_models import SMALL


@pytest.fixture
def no_gc():
    """Only reference counting frees objects: whatever a cycle holds stays alive."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def staging(monkeypatch):
    """Weak references to every staging tensor handlers materialize."""
    refs = []
    materialize = Handler.materialize

    def tracked(self, rec, device):
        tensors = materialize(self, rec, device)
        refs.extend(weakref.ref(t) for t in tensors.values())
        return tensors

    monkeypatch.setattr(Handler, "materialize", tracked)
    return refs


def _session_refs(session):
    parts = [session, session.plan, session.driver, session.batch, session.writer]
    return [*(weakref.ref(p) for p in parts),
            *(weakref.ref(r) for r in session.plan.layers.values())]


def test_load_leaves_no_session_record_or_staging_alive(no_gc, staging):
    """After a load only the model and the report remain; the report holds no session."""
    model = build_model(SMALL)
    session = loadfsm.LoadSession(model, quant="fp8", device="cpu")
    refs = _session_refs(session)
    report = run(session, IteratorSource(reference_state_dict(SMALL, 0).items()))
    del session
    assert staging and all(ref() is None for ref in refs + staging)
    assert not hasattr(report, "session")


def test_push_leaves_no_session_record_or_staging_alive(no_gc, staging):
    """After a push and dropping the sync, nothing of the push stays alive."""
    model = build_model(SMALL)
    report = loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8",
                          device="cpu")
    sync = loadfsm.WeightSync(model, session=report)
    refs = _session_refs(sync.session)
    sync.push(reference_state_dict(SMALL, 1).items())
    del sync
    assert staging and all(ref() is None for ref in refs + staging)


def test_failed_load_leaves_nothing_alive(no_gc, staging):
    """A load that raised frees its session, records and staging too."""
    model = build_model(SMALL)
    items = list(reference_state_dict(SMALL, 0).items())
    session = loadfsm.LoadSession(model, quant="fp8", device="cpu")
    refs = _session_refs(session)
    with pytest.raises(loadfsm.IncompleteLoadError):
        run(session, IteratorSource(items[:-4]))
    del session
    assert staging and all(ref() is None for ref in refs + staging)


def test_dropping_model_and_report_frees_the_weights(no_gc):
    """The loaded weights die with the model and the report: no cycle keeps them."""
    model = build_model(SMALL)
    report = loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8",
                          device="cpu")
    loadfsm.WeightSync(model, session=report).push(reference_state_dict(SMALL, 1).items())
    weights = [weakref.ref(t) for t in [*model.parameters(), *model.buffers()]]
    assert all(ref() is not None for ref in weights)
    del model, report
    assert all(ref() is None for ref in weights)
