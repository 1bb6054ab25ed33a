"""Weight sync on CUDA: a graph captured before a push replays the pushed weights."""

import pytest
import torch

import loadfsm
from loadfsm.testing import build_model, load_reference_model, reference_state_dict
from checks import addresses, assert_same_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUANTS = ["fp8", "fp8-channel"]


def _load(state, quant):
    model = build_model("tiny")
    report = loadfsm.load(model, state.items(), quant=quant, device="cuda")
    return model.eval(), report


def _capture(model, ids):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):                          # warm up outside the graph
            model(ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(ids)
    return graph, out


@pytest.mark.parametrize("quant", QUANTS)
def test_graph_replay_after_push_gives_fresh_load_output(quant):
    """Capture the forward, push seed 1, replay: the output of a fresh load of seed 1."""
    model, report = _load(reference_state_dict("tiny", 0), quant)
    ids = torch.randint(0, 4096, (2, 16), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    graph, out = _capture(model, ids)
    graph.replay()
    before, addrs = out.clone(), addresses(model)
    loadfsm.WeightSync(model).push(reference_state_dict("tiny", 1).items())
    graph.replay()
    torch.cuda.synchronize()
    fresh, _ = _load(reference_state_dict("tiny", 1), quant)
    with torch.no_grad():
        expected = fresh(ids)
    assert not torch.equal(out, before)
    assert torch.equal(out, expected)
    assert addresses(model) == addrs


@pytest.mark.parametrize("quant", QUANTS + ["fp8-block"])
def test_cuda_push_of_trainer_parameters_matches_fresh_load(quant):
    """A trainer's CUDA named_parameters() pushed into a CUDA engine equal a fresh load."""
    model, report = _load(reference_state_dict("tiny", 0), quant)
    trainer = load_reference_model("tiny", seed=1, device="cuda")
    loadfsm.WeightSync(model).push(trainer.named_parameters())
    fresh, _ = _load(reference_state_dict("tiny", 1), quant)
    assert_same_tensors(model.state_dict(), fresh.state_dict())
