"""The layer machine: its table, illegal moves, and the cost of planning at scale."""

import gc

import pytest
import torch
from torch import nn

import loadfsm
from loadfsm.handlers.base import Handler
from loadfsm.layer import LayerRecord
from loadfsm import LoadSession
from loadfsm.pieces import Piece
from loadfsm.plan import _collector_paused, plan_layers
from loadfsm.states import TRANSITIONS, LayerState
from op_count import lines_run


def _record():
    return LayerRecord("layer0", nn.Identity(), handler=None, slots={})


def test_lifecycle_walks_meta_to_finalized():
    """arrive, complete, quantize, finalize take a layer from META to FINALIZED."""
    rec = _record()
    seen = [rec.fire(t)[1] for t in ("arrive", "arrive", "complete", "quantize", "finalize")]
    assert seen == [LayerState.PARTIAL, LayerState.PARTIAL, LayerState.COMPLETE,
                    LayerState.QUANTIZED, LayerState.FINALIZED]


def test_reload_returns_to_meta_and_rollback_to_finalized():
    """A FINALIZED layer reloads to META; an unfinished reload rolls back to FINALIZED."""
    rec = _record()
    for trigger in ("arrive", "complete", "quantize", "finalize", "reload", "arrive"):
        rec.fire(trigger)
    assert rec.fire("rollback") == (LayerState.PARTIAL, LayerState.FINALIZED)


@pytest.mark.parametrize("trigger", ["complete", "quantize", "finalize", "reload"],
                         ids=lambda t: t)
def test_illegal_trigger_raises_naming_the_layer(trigger):
    """A trigger the table does not allow from META raises IllegalTransitionError."""
    with pytest.raises(loadfsm.IllegalTransitionError, match="layer0"):
        _record().fire(trigger)


def test_unknown_trigger_raises():
    """A trigger that is not in the table raises, it is never ignored."""
    with pytest.raises(loadfsm.IllegalTransitionError, match="unknown trigger"):
        _record().fire("teleport")


def test_table_has_one_row_per_trigger_and_source():
    """The transition table is unambiguous: one destination per (trigger, source)."""
    seen = set()
    for row in TRANSITIONS:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        for source in sources:
            assert (row["trigger"], source) not in seen
            seen.add((row["trigger"], source))


def test_fire_moves_exactly_as_the_table_says():
    """Every trigger from every state: the table's destination, or IllegalTransitionError."""
    table = {}
    for row in TRANSITIONS:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        table.update({(row["trigger"], source): row["dest"] for source in sources})
    for trigger in {row["trigger"] for row in TRANSITIONS}:
        for state in LayerState:
            rec = _record()
            rec.state = state
            if (trigger, state) in table:
                assert rec.fire(trigger) == (state, table[trigger, state])
                assert rec.state is table[trigger, state]
            else:
                with pytest.raises(loadfsm.IllegalTransitionError, match=state.name):
                    rec.fire(trigger)
                assert rec.state is state


class _Many(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(nn.LayerNorm(2) for _ in range(n))


def _plan_lines(n):
    """The Python lines planning an ``n``-layer model executes; the plan has every layer."""
    with torch.device("meta"):
        model = _Many(n)
    with lines_run() as work:
        session = LoadSession(model, device="cpu")
    assert len(session.plan.layers) == n
    return work.lines


def test_planning_is_linear_in_layers():
    """A layer costs planning the same at 3,000 layers as at 300: linear, never quadratic.
    Work is counted in Python lines, not timed (benchmarks/scaling_bench.py times it)."""
    small, middle, large = (_plan_lines(n) for n in (300, 1_000, 3_000))
    low, high = (middle - small) / 700, (large - middle) / 2_000
    # Linear keeps the two slopes equal; quadratic makes the second about 3x the first.
    assert high < 1.25 * low, (low, high)


def test_abandon_returns_an_unfinished_first_load_to_meta_never_a_finalized_layer():
    """A failed first load takes its unfinished layers back to META; FINALIZED stays."""
    rec = _record()
    for trigger in ("arrive", "complete", "quantize"):
        rec.fire(trigger)
    assert rec.fire("abandon") == (LayerState.QUANTIZED, LayerState.META)
    for trigger in ("arrive", "complete", "quantize", "finalize"):
        rec.fire(trigger)
    with pytest.raises(loadfsm.IllegalTransitionError, match="abandon"):
        rec.fire("abandon")


def _choose_noting_thresholds(seen):
    def choose(name, module):
        seen.append(gc.get_threshold())
        return Handler()
    return choose


def test_planning_holds_back_full_collections_and_restores_the_thresholds():
    """While planning builds its records the cyclic collector's full passes wait (they would
    scan the whole heap several times over a 100k-layer plan); its thresholds come back."""
    with torch.device("meta"):
        model = _Many(3)
    before, seen = gc.get_threshold(), []
    plan_layers(model, _choose_noting_thresholds(seen))
    assert len(seen) == 3 and all(t[:2] == before[:2] and t[2] > before[2] for t in seen)
    assert gc.get_threshold() == before
    with pytest.raises(ValueError, match="lacks"):
        plan_layers(model, _choose_noting_thresholds(seen), [Piece("x", "no.such.param")])
    assert gc.get_threshold() == before


def test_overlapping_plans_leave_the_collector_as_it_was():
    """Two plans whose pauses overlap and end in either order (two threads) never leave
    the collector paused."""
    before = gc.get_threshold()
    for first_out in (0, 1):
        pauses = [_collector_paused(), _collector_paused()]
        for pause in pauses:
            pause.__enter__()
        assert gc.get_threshold()[2] > before[2]
        for pause in (pauses[first_out], pauses[1 - first_out]):
            pause.__exit__(None, None, None)
        assert gc.get_threshold() == before
