"""FP8 weights are proven finite by their own scales (max|w| over the rows each covers,
NaN/Inf included) instead of a second reduction of the weight: a bad value is still
named by the exact piece that carried it, in a load and in a push, for every
granularity; where a scale cannot single a piece out, the weight is reduced as before."""

import pytest
import torch

import loadfsm
import loadfsm.loading.finiteness as finiteness
from loadfsm.loading.finiteness import scale_checked
from loadfsm.testing import build_model, reference_state_dict
from tests.checks import snapshot, same
from tests.tiny_models import FusedQKVModel, meta_model, random_state

QUANTS = ["fp8", "fp8-channel", "fp8-block"]
LAYER = "model.layers.1"
PIECES = {f"{LAYER}.self_attn.{p}_proj.weight": f"{LAYER}.self_attn.{l}"
          for p, l in [("q", "qkv_proj"), ("k", "qkv_proj"), ("v", "qkv_proj"),
                       ("o", "o_proj")]}
PIECES |= {f"{LAYER}.mlp.{p}_proj.weight": f"{LAYER}.mlp.{l}"
           for p, l in [("gate", "gate_up_proj"), ("up", "gate_up_proj"),
                        ("down", "down_proj")]}


def _poisoned(name: str, bad: float) -> dict:
    state = reference_state_dict("tiny")
    rows, cols = state[name].shape
    state[name][rows // 2 + 1, cols // 3] = bad
    return state


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("name", list(PIECES))
def test_a_nan_is_named_by_its_piece_in_a_load(quant, name):
    with pytest.raises(loadfsm.NonFiniteWeightError) as err:
        loadfsm.load(build_model("tiny"), _poisoned(name, float("nan")).items(), quant=quant,
                     device="cpu")
    assert (err.value.tensor, err.value.layer) == (name, PIECES[name])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinity_is_named_by_its_piece_in_a_push(quant, bad):
    model = build_model("tiny")
    loadfsm.load(model, reference_state_dict("tiny").items(), quant=quant, device="cpu")
    before = snapshot(model)
    name = f"{LAYER}.self_attn.k_proj.weight"
    with pytest.raises(loadfsm.PushError) as err:
        loadfsm.WeightSync(model).push(_poisoned(name, bad).items())
    cause = err.value.__cause__
    assert isinstance(cause, loadfsm.NonFiniteWeightError)
    assert (cause.tensor, cause.layer) == (name, PIECES[name])
    after = snapshot(model)
    assert all(same(after[key], value) for key, value in before.items())


@pytest.mark.parametrize("quant, checked", [
    ("fp8", {"o_proj", "down_proj"}),             # one scale per matrix: whole pieces only
    ("fp8-channel", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("fp8-block", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),   # 128-row pieces
])
def test_the_weights_whose_scales_single_out_every_piece(quant, checked):
    session = loadfsm.LoadSession(build_model("tiny"), quant=quant, device="cpu")
    got = {name.rsplit(".", 1)[1] for name, rec in session.plan.layers.items()
           if name.startswith(LAYER + ".") and scale_checked(rec, session.quant)}
    assert got == checked


def test_a_block_scale_that_straddles_pieces_leaves_the_check_to_the_rows():
    """k and v (32 rows each) share a 128-row block with q: the rows are reduced."""
    session = loadfsm.LoadSession(meta_model(FusedQKVModel), quant="fp8-block", device="cpu")
    assert all(not scale_checked(rec, session.quant) for rec in session.plan.layers.values())
    state = random_state(FusedQKVModel)
    state["v_proj.weight"][3, 4] = float("nan")
    with pytest.raises(loadfsm.NonFiniteWeightError) as err:
        loadfsm.load(meta_model(FusedQKVModel), state.items(), quant="fp8-block", device="cpu")
    assert err.value.tensor == "v_proj.weight"


@pytest.mark.parametrize("quant", QUANTS)
def test_weights_checked_by_scale_are_not_reduced_again(quant, monkeypatch):
    reduced = []
    real = finiteness._rows
    monkeypatch.setattr(finiteness, "_rows", lambda t: (reduced.append(t.shape), real(t))[1])
    model = build_model("tiny")
    loadfsm.load(model, reference_state_dict("tiny").items(), quant=quant, device="cpu")
    weights = {tuple(m.weight.shape) for name, m in model.named_modules()
               if name.endswith(("o_proj", "down_proj"))}
    assert not weights & {tuple(s) for s in reduced if len(s) == 2}
