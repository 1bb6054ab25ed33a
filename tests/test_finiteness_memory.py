"""The NaN/Inf check allocates nothing the size of a layer: on a GPU a float64 copy of a
bf16 staging tensor (4x its bytes) broke the peak bound of final + one layer."""

import torch
from torch.profiler import ProfilerActivity, profile

import loadfsm
from loadfsm.loading.finiteness import FinitenessBatch
from loadfsm.testing import build_model


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.key_averages()), default=0)


def test_the_layer_and_piece_checks_allocate_a_small_fraction_of_the_layer():
    session = loadfsm.LoadSession(build_model("tiny"), quant="fp8", device="cpu")
    rec = max(session.plan.layers.values(),
              key=lambda r: sum(s.shape.numel() for s in r.slots.values()))
    staging = session.driver.stage(rec)
    for tensor in staging.values():
        tensor.normal_()
    layer_bytes = sum(t.numel() * t.element_size() for t in staging.values())
    rec.arrived = list(rec.pieces)
    whole_layer = _largest_allocation(lambda: FinitenessBatch.record_layer(rec, {}))
    one_piece = _largest_allocation(lambda: [FinitenessBatch.record_norm(rec, (n,), t)
                                             for n, t in staging.items()])
    assert rec.norms and max(whole_layer, one_piece) < layer_bytes / 10, (
        whole_layer, one_piece, layer_bytes)
