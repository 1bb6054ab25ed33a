"""Per-name cost of a push (many small expert tensors): O(1) work per arrival, counted;
one NaN/Inf check per layer tensor that still names the exact piece; the trace keeps one
event per transition."""

from dataclasses import replace

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

import loadfsm
from loadfsm.pieces import Piece
from loadfsm.reload.transaction import ReloadTransaction
from loadfsm.testing import build_model, reference_state_dict
from checks import assert_same_tensors
from op_count import lines_run
from tiny_models import SMALL, randn

# Lines a pushed tensor may cost between the iterator and the staging copy (the feed loop,
# the item check, the driver's arrival): 43 now, ~150 before the per-name work (a route
# made per name, a max|x| kernel, a machine trigger and trace arguments per piece).
LINES_PER_ARRIVAL = 45


def _moe(experts):
    return replace(SMALL, num_layers=1, num_experts=experts, experts_per_token=2,
                   moe_intermediate_size=16)


def _expert_tensors(config, seed=1):
    h, i = config.hidden_size, config.moe_intermediate_size
    out = []
    for e in range(config.num_experts):
        prefix = f"model.layers.0.mlp.experts.{e}."
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            out.append((f"{prefix}{proj}.weight", randn(*shape, seed=seed + len(out))))
    return out


def _synced(config):
    model = build_model(config)
    loadfsm.load(model, None, load_format="dummy", quant="fp8", device="cpu")
    return model, loadfsm.WeightSync(model)


def _lines_per_arrival(experts, arrivals=24):
    """Python lines per tensor fed into a layer already in flight (none completes it), in
    a push after the first (which works out where each name lands, once)."""
    _, sync = _synced(_moe(experts))
    items = _expert_tensors(_moe(experts))
    sync.push(items)
    push = ReloadTransaction(sync.session)
    with push:
        push.feed(items[:8], sync._routes)                 # R1 and staging: not counted
        with lines_run() as work:
            push.feed(items[8:8 + arrivals], sync._routes)
        push.roll_back()
    return work.lines / arrivals


def test_arrival_work_does_not_grow_with_the_layers_pieces():
    """A layer of 768 expert pieces costs each arrival what a layer of 48 does, and little."""
    small, large = _lines_per_arrival(16), _lines_per_arrival(256)
    assert large <= small + 0.5, (small, large)
    assert small <= LINES_PER_ARRIVAL, small


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("expert,proj", [(0, "gate_proj"), (5, "up_proj"), (7, "down_proj")],
                         ids=["first", "middle", "last"])
def test_non_finite_expert_is_named_and_rolled_back(expert, proj, bad):
    """One bad value in one of 24 expert pieces: the push fails naming that piece; the
    layer keeps its old weights."""
    model, sync = _synced(_moe(8))
    old = {n: t.clone() for n, t in model.state_dict().items()}
    items = dict(_expert_tensors(_moe(8)))
    name = f"model.layers.0.mlp.experts.{expert}.{proj}.weight"
    items[name][1, 2] = bad
    with pytest.raises(loadfsm.PushError) as info:
        sync.push(items.items())
    cause = info.value.__cause__
    assert isinstance(cause, loadfsm.NonFiniteWeightError)
    assert cause.tensor == name and cause.layer == "model.layers.0.mlp.experts"
    assert all(torch.equal(t, old[n]) for n, t in model.state_dict().items())


class ColumnHalvesModel(nn.Module):
    """One linear whose checkpoint stores the left and right column halves apart: pieces
    that split rows, which the layer's row check cannot tell apart."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32, bias=False)

    def checkpoint_pieces(self):
        return [Piece("left.weight", "proj.weight", (slice(0, 32), slice(0, 32))),
                Piece("right.weight", "proj.weight", (slice(0, 32), slice(32, 64)))]


@pytest.mark.parametrize("bad", ["left.weight", "right.weight"])
def test_non_finite_column_piece_is_named(bad):
    """A NaN in a piece that shares rows with another is still named by its own piece."""
    state = {"left.weight": randn(32, 32, seed=1), "right.weight": randn(32, 32, seed=2)}
    state[bad][3, 4] = float("nan")
    with torch.device("meta"):
        model = ColumnHalvesModel().to(torch.bfloat16)
    with pytest.raises(loadfsm.NonFiniteWeightError) as info:
        loadfsm.load(model, state.items(), quant="fp8", device="cpu")
    assert info.value.tensor == bad


def test_traced_push_keeps_one_event_per_arrival():
    """With a trace sink, every arrival still fires its transition and emits its event."""
    model = build_model(_moe(4))
    loadfsm.load(model, None, load_format="dummy", quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model, trace=True)
    items = _expert_tensors(_moe(4))
    with capture_logs() as logs:
        sync.push(items)
    arrivals = [e for e in logs if e["event"] == "layer_transition" and e["trigger"] == "arrive"]
    assert [e["piece"] for e in arrivals] == [name for name, _ in items]
    assert [e["src"] for e in arrivals] == ["META"] + ["PARTIAL"] * (len(items) - 1)


def test_expert_push_equals_a_fresh_load():
    """A push of every expert tensor gives the tensors a fresh load of the same weights gives."""
    config = _moe(8)
    state = reference_state_dict(config, 0)
    model = build_model(config)
    sync = loadfsm.WeightSync(model, session=loadfsm.load(model, state.items(), quant="fp8",
                                                           device="cpu"))
    items = _expert_tensors(config)
    sync.push(items)
    fresh = build_model(config)
    loadfsm.load(fresh, {**state, **dict(items)}.items(), quant="fp8", device="cpu")
    assert_same_tensors(model.state_dict(), fresh.state_dict())
