"""A push commits a large tensor of a plain layer straight from the trainer's memory
(no staging copy), before the trainer's iterator moves on: a trainer that reuses its
buffer for the next tensor never corrupts the engine; ``atomic="model"`` copies as
before; bad values are refused with nothing live changed."""

import pytest
import torch

import loadfsm
import loadfsm.loading.driver as driver
from loadfsm.testing import build_model, reference_state_dict
from tests.checks import same, snapshot

EMBED = "model.embed_tokens.weight"


@pytest.fixture
def borrow_small(monkeypatch):
    """Every tensor of the tiny model's embedding size counts as large."""
    size = reference_state_dict("tiny")[EMBED].nbytes
    monkeypatch.setattr(driver, "BORROW_MIN_BYTES", size)


def _loaded(quant="fp8"):
    model = build_model("tiny")
    loadfsm.load(model, reference_state_dict("tiny").items(), quant=quant, device="cpu")
    return model


def _reusing(state: dict):
    """The trainer's iterator: every tensor is overwritten once the next is asked for,
    as a trainer gathering each parameter into one reused buffer would."""
    for name, tensor in state.items():
        yield name, tensor
        tensor.fill_(float("nan"))


def _borrowed_layers(sync) -> list[str]:
    seen = []
    real = sync.session.driver.borrowed
    sync.session.driver.borrowed = lambda rec: (real(rec) and seen.append(rec.name)
                                                or real(rec))
    return seen


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_a_borrowed_tensor_is_committed_before_the_trainer_moves_on(borrow_small, quant):
    """The trainer overwrites each tensor with NaN once the next is asked for: the push
    still succeeds and equals a fresh load, since every tensor was consumed in time."""
    model, fresh = _loaded(quant), build_model("tiny")
    loadfsm.load(fresh, reference_state_dict("tiny", 1).items(), quant=quant, device="cpu")
    live = model.get_submodule("model.embed_tokens").weight
    address = live.data_ptr()
    sync = loadfsm.WeightSync(model)
    borrowed = _borrowed_layers(sync)
    sync.push(_reusing(reference_state_dict("tiny", 1)))
    assert "model.embed_tokens" in borrowed and live.data_ptr() == address
    expected = fresh.state_dict()
    for name, tensor in model.state_dict().items():
        assert same(tensor, expected[name]), name


def test_small_tensors_are_copied_not_borrowed():
    sync = loadfsm.WeightSync(_loaded())
    borrowed = _borrowed_layers(sync)
    sync.push(reference_state_dict("tiny", 1).items())
    assert borrowed == []


def test_atomic_model_pushes_copy_instead_of_borrowing(borrow_small):
    """All or nothing holds every layer to the end: nothing is borrowed, and the buffer
    the trainer reuses does not matter either."""
    model, fresh = _loaded(), _loaded()
    loadfsm.load(fresh, reference_state_dict("tiny", 1).items(), quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model, atomic="model")
    borrowed = _borrowed_layers(sync)
    sync.push(_reusing(reference_state_dict("tiny", 1)))
    assert borrowed == []
    expected = fresh.state_dict()
    for name, tensor in model.state_dict().items():
        assert same(tensor, expected[name]), name


def test_nan_in_a_borrowed_tensor_changes_nothing(borrow_small):
    model = _loaded()
    before = snapshot(model)
    new = reference_state_dict("tiny", 1)
    new[EMBED][5, 7] = float("nan")
    with pytest.raises(loadfsm.PushError) as err:
        loadfsm.WeightSync(model).push(new.items())
    assert err.value.__cause__.tensor == EMBED
    after = snapshot(model)
    assert same(after[EMBED], before[EMBED])
