"""Layers in flight: a user iterator that interleaves layers warns once, completes, and
gives the ordered result; per-arrival cost stays O(1)."""

from dataclasses import replace

import pytest
from structlog.testing import capture_logs

import loadfsm
from loadfsm.testing import CONFIGS, build_model, reference_state_dict
from checks import assert_same_tensors
from op_count import lines_run
from tiny_models import round_robin


def _load(config, stream, quant="fp8", **kwargs):
    model = build_model(config)
    with capture_logs() as logs:
        report = loadfsm.load(model, stream, quant=quant, device="cpu", **kwargs)
    return model, report, [e for e in logs if e["event"] == "layers_in_flight"]


@pytest.fixture(scope="module")
def tiny_state():
    """The tiny checkpoint's tensors in model order."""
    return reference_state_dict("tiny")


@pytest.fixture(scope="module")
def mixed(tiny_state):
    """The tiny checkpoint in round-robin order over its layers."""
    return round_robin("tiny", tiny_state)


def test_interleaved_iterator_warns_once(mixed):
    """The layers_in_flight warning fires exactly once, naming the layers and their MB."""
    _, report, warnings = _load("tiny", mixed)
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning["log_level"] == "warning" and warning["limit"] == 2
    assert warning["count"] == len(warning["layers"]) == 3
    assert all(layer in report.layer_states for layer in warning["layers"])
    assert warning["staging_mb"] > 0
    assert report.max_layers_in_flight > 2


@pytest.mark.parametrize("quant", [None, "fp8"], ids=["bf16", "fp8"])
def test_interleaved_iterator_completes_bit_identical(tiny_state, mixed, quant):
    """The interleaved load completes and equals the ordered load bit for bit."""
    ordered, _, quiet = _load("tiny", list(tiny_state.items()), quant)
    interleaved, report, _ = _load("tiny", mixed, quant)
    assert quiet == []
    assert report.states["FINALIZED"] == len(report.layer_states)
    assert_same_tensors(interleaved.state_dict(), ordered.state_dict())


def test_interleaved_iterator_frees_every_staging(mixed):
    """After an interleaved load nothing is left in flight and the ledger holds no staging."""
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    for name, tensor in mixed:
        session.arrive(name, tensor)
    report = session.finish()
    assert session.driver.in_flight == {} and session.ledger.staging == 0
    assert report.final_bytes == session.ledger.final


@pytest.mark.parametrize("limit", [0, 4], ids=["limit0", "limit4"])
def test_max_in_flight_is_configurable(mixed, limit):
    """The warning fires once the configured number of layers in flight is exceeded."""
    _, _, warnings = _load("tiny", mixed, max_in_flight=limit)
    assert len(warnings) == 1
    assert warnings[0]["limit"] == limit and warnings[0]["count"] == limit + 1


def test_no_warning_under_the_limit(mixed):
    """With a limit above the layers in flight, no warning fires."""
    _, report, warnings = _load("tiny", mixed, max_in_flight=1000)
    assert warnings == [] and report.max_layers_in_flight > 2


def _moe(experts):
    return replace(CONFIGS["tiny-moe"], vocab_size=128, hidden_size=32, intermediate_size=32,
                   num_layers=1, num_heads=2, num_kv_heads=1, head_dim=None, max_seq_len=8,
                   num_experts=experts, experts_per_token=2, moe_intermediate_size=16)


def _load_lines(experts):
    """(arrivals, Python lines run) of an interleaved FP8 load with ``experts`` experts."""
    config = _moe(experts)
    stream = round_robin(config, reference_state_dict(config))
    model = build_model(config)
    with lines_run() as work:
        report = loadfsm.load(model, stream, quant="fp8", device="cpu", max_in_flight=1000)
    assert report.states["FINALIZED"] == len(report.layer_states)
    return len(stream), work.lines


def test_per_arrival_cost_flat_in_experts():
    """An arrival costs the same at 256 experts as at 16: O(1), not O(experts). Work is
    counted in Python lines, not timed (benchmarks/scaling_bench.py times it)."""
    (n1, c1), (n2, c2), (n3, c3) = (_load_lines(e) for e in (16, 64, 256))
    low, high = (c2 - c1) / (n2 - n1), (c3 - c2) / (n3 - n2)
    # Linear cost keeps the slopes equal; a scan of the layer's pieces per arrival grows
    # the second slope with the 4x larger layer.
    assert high < 1.25 * low, (low, high)
