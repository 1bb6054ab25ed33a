"""INT8 weight-only on CUDA: the same codes as the CPU, the matmul against the CPU
reference and torch's own CUDA kernel, graph capture across a push, load and push."""

import pytest
import torch
import torch.nn.functional as F

import loadfsm
from loadfsm.quant import (Int8Config, Int8Linear, Int8StackedExperts, dequantize_int8,
                           int8_matmul, quantize_int8, sqnr_db)
from loadfsm.quant.experts import StackedExperts
from loadfsm.quant.int8 import use_int8pack_mm
from loadfsm.testing import build_model, load_reference_model, reference_state_dict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(256, 512), (200, 300), (3, 96, 160), (8, 40000)]


def _randn(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_codes_equal_cpu_codes(shape):
    """Quantizing on CUDA gives exactly the CPU's codes and scales (IEEE division)."""
    w = _randn(*shape) * torch.logspace(-3, 3, shape[-2])[:, None].bfloat16()
    q, scale = quantize_int8(w.cuda())
    q_cpu, scale_cpu = quantize_int8(w)
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(scale.cpu(), scale_cpu)


@pytest.mark.parametrize("rows", [1, 8, 512], ids=["decode", "batch", "prefill"])
def test_linear_cuda_matches_float32_reference(rows):
    """Int8Linear on CUDA stays >= 40 dB from float32 math on the dequantized weight, and
    takes the F.linear path (cuBLAS on the exactly converted weight)."""
    w, bias, x = _randn(512, 1024), _randn(512, seed=1), _randn(rows, 1024, seed=2)
    q, scale = quantize_int8(w.cuda())
    layer = Int8Linear.from_quantized(q, scale, bias.cuda(), Int8Config())
    expected = F.linear(x.float(), dequantize_int8(q, scale, torch.float32).cpu(), bias.float())
    assert not use_int8pack_mm(x.cuda(), q, scale)
    assert sqnr_db(expected, layer(x.cuda()).cpu()) >= 40.0


def test_torch_cuda_int8pack_mm_agrees_when_present():
    """Where torch has a CUDA _weight_int8pack_mm, it computes the same product as the
    path loadfsm takes (>= 45 dB of each other): its speed is what BENCHMARKS compares."""
    q, scale = quantize_int8(_randn(256, 512).cuda())
    x = _randn(4, 512, seed=3).cuda()
    try:
        kernel = torch._weight_int8pack_mm(x, q, scale.view(-1))
    except (AttributeError, NotImplementedError, RuntimeError) as err:
        pytest.skip(f"no CUDA _weight_int8pack_mm here: {err}")
    assert sqnr_db(int8_matmul(x, q, scale, None, torch.bfloat16).float(), kernel.float()) >= 45.0


def test_stacked_experts_cuda():
    """Int8StackedExperts runs on CUDA within 35 dB of its bf16 twin."""
    gate_up, down = _randn(4, 128, 64, seed=1).cuda(), _randn(4, 64, 64, seed=2).cuda()
    experts = Int8StackedExperts.from_quantized(*quantize_int8(gate_up), *quantize_int8(down),
                                                Int8Config())
    x = _randn(16, 64, seed=3).cuda()
    ids = torch.stack([torch.arange(16) % 4, (torch.arange(16) + 1) % 4], dim=1).cuda()
    weights = torch.full((16, 2), 0.5, dtype=torch.bfloat16, device="cuda")
    reference = StackedExperts(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference.gate_up_proj.copy_(gate_up)
        reference.down_proj.copy_(down)
        assert sqnr_db(reference(x, ids, weights).float(), experts(x, ids, weights).float()) >= 35.0


def _load(state):
    model = build_model("tiny")
    loadfsm.load(model, state.items(), quant="int8", device="cuda")
    return model.eval()


def test_graph_replay_after_push_gives_fresh_load_output():
    """Capture the INT8 forward, push seed 1, replay: exactly a fresh load's output, and
    no tensor moved."""
    model = _load(reference_state_dict("tiny", 0))
    ids = torch.randint(0, 4096, (2, 16), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):                          # warm up outside the graph
            model(ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(ids)
    graph.replay()
    before = out.clone()
    addresses = {n: t.data_ptr() for n, t in model.state_dict().items()}
    loadfsm.WeightSync(model).push(load_reference_model("tiny", seed=1,
                                                        device="cuda").named_parameters())
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = _load(reference_state_dict("tiny", 1))(ids)
    assert not torch.equal(out, before)
    assert torch.equal(out, expected)
    assert addresses == {n: t.data_ptr() for n, t in model.state_dict().items()}
