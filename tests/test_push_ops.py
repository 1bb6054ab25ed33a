"""Torch ops per layer of a push and of a load, counted (not timed) against ceilings.

On a GPU every op is a kernel launch or an allocation (5-10 us of host time each), and a
push of Llama-8B shapes is bound by them: a change that adds ops per layer fails here.
Counted on the CPU, where FP8 quantizes on the torch reference (more ops than the two
Triton launches of a GPU); ``benchmarks/push_overhead.py`` shows where the ops go. The
count per decoder layer is the difference between models of four and two decoder
layers, so what a push or a load pays once (embeddings, the lock, the read-back of the
verification) is not in it.
"""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

import loadfsm
from loadfsm.testing import build_model, reference_state_dict
from op_count import torch_ops
from tiny_models import SMALL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import push_overhead  # noqa: E402

# Per decoder layer (fused qkv from 3 pieces, o_proj, fused gate_up from 2, down_proj,
# 2 norms), on the CPU. Lower them when a change saves ops; never raise them silently.
PUSH_CEILING = {"fp8": 84, "fp8-channel": 78, "fp8-block": 150}
LOAD_CEILING = 160


def _ops(run) -> int:
    with torch_ops() as ops:
        run()
    return sum(ops.values())


def _per_decoder_layer(ops_of) -> float:
    """``ops_of(config)`` for 4 decoder layers less that for 2, per layer."""
    return (ops_of(replace(SMALL, num_layers=4)) - ops_of(replace(SMALL, num_layers=2))) / 2


def _push_ops(quant: str):
    def ops_of(config) -> int:
        model = build_model(config)
        loadfsm.load(model, reference_state_dict(config, 0).items(), quant=quant,
                      device="cpu")
        sync = loadfsm.WeightSync(model)
        weights = list(reference_state_dict(config, 1).items())
        sync.push(weights)                                   # the layers' first push
        return _ops(lambda: sync.push(weights))
    return ops_of


@pytest.mark.parametrize("quant", sorted(PUSH_CEILING))
def test_push_ops_per_decoder_layer_stay_under_the_ceiling(quant):
    """A push's torch ops per decoder layer are at most the ceiling."""
    assert _per_decoder_layer(_push_ops(quant)) <= PUSH_CEILING[quant]


def test_push_ops_do_not_grow_from_push_to_push():
    """The tenth push into a model dispatches exactly the ops of its second."""
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model)
    weights = list(reference_state_dict(SMALL, 1).items())
    counts = [_ops(lambda: sync.push(weights)) for _ in range(10)]
    assert counts[1] == counts[-1]


def test_load_ops_per_decoder_layer_stay_under_the_ceiling():
    """A first FP8 load's torch ops per decoder layer are at most the ceiling."""
    def ops_of(config) -> int:
        model, weights = build_model(config), list(reference_state_dict(config, 0).items())
        return _ops(lambda: loadfsm.load(model, weights, quant="fp8", device="cpu"))

    assert _per_decoder_layer(ops_of) <= LOAD_CEILING


def test_the_benchmark_counts_the_ops_counted_here():
    """``benchmarks/push_overhead.py`` reports, per layer of the same model, the ops a
    push dispatches here, split by phase."""
    result = push_overhead.worker("push", SMALL.num_layers, "fp8", 1)
    model = build_model(SMALL)
    loadfsm.load(model, reference_state_dict(SMALL, 0).items(), quant="fp8", device="cpu")
    sync = loadfsm.WeightSync(model)
    weights = list(reference_state_dict(SMALL, 1).items())
    sync.push(weights)
    assert round(result["ops"] * result["layers"]) == _ops(lambda: sync.push(weights))
    assert sum(result["ops_by"].values()) == pytest.approx(result["ops"])
