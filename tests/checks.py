"""Comparisons the tests share: tensors equal bit for bit, a model's tensors and their
addresses, per-layer old/new verdicts after a push, engine loaders given back, and a
layer's exact reload sequence in a trace; the FP8 block GEMM emulated from its operands."""

from __future__ import annotations

import torch


def bits(tensor):
    return tensor.detach().reshape(-1).view(torch.uint8)


def same(a, b):
    """Same dtype, shape and bytes (FP8, NaN and -0.0 included); a meta tensor is never same."""
    return (a.dtype == b.dtype and a.shape == b.shape and not a.is_meta and not b.is_meta
            and torch.equal(bits(a), bits(b)))


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    """Same names, and under each name the same tensor bit for bit."""
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert same(ours[name], tensor), name


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def addresses(model):
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: (t.data_ptr(), t.shape, t.stride(), t.dtype) for name, t in tensors.items()}


def layer_verdicts(model, old, new):
    """Per layer (module name): {'old'}, {'new'} or {'old', 'new'} (both alike).

    Fails when a layer mixes old and new tensors or matches neither."""
    verdict = {}
    for name, tensor in model.state_dict().items():
        kinds = {k for k, ref in (("old", old), ("new", new)) if same(tensor, ref[name])}
        assert kinds, f"{name} is neither old nor new"
        layer = name.rpartition(".")[0]
        verdict[layer] = verdict.get(layer, kinds) & kinds
        assert verdict[layer], f"layer {layer} mixes old and new tensors"
    return verdict


def old_or_new(model, old, new):
    """Per layer that differs between ``old`` and ``new``: "old" or "new" (fails as
    ``layer_verdicts`` does)."""
    return {layer: "new" if kinds == {"new"} else "old"
            for layer, kinds in layer_verdicts(model, old, new).items() if len(kinds) == 1}


def loader_snapshot(model):
    """Each parameter with a copy of its attributes (an engine's ``weight_loader`` among them)."""
    return {name: (p, dict(vars(p))) for name, p in model.named_parameters()}


def assert_loaders_restored(snapshot):
    """Every parameter holds exactly the attribute objects ``loader_snapshot`` saw."""
    for name, (param, attrs) in snapshot.items():
        assert vars(param).keys() == attrs.keys(), name
        assert all(vars(param)[k] is v for k, v in attrs.items()), name


RELOAD_QKV = [("FINALIZED", "META", "reload"), ("META", "PARTIAL", "arrive"),
              ("PARTIAL", "PARTIAL", "arrive"), ("PARTIAL", "PARTIAL", "arrive"),
              ("PARTIAL", "COMPLETE", "complete"), ("COMPLETE", "QUANTIZED", "quantize"),
              ("QUANTIZED", "FINALIZED", "finalize")]


def assert_qkv_reloaded(logs, layer):
    """The trace of one push shows fused ``layer``'s exact reload sequence, then the summary."""
    steps = [(e["src"], e["dst"], e["trigger"]) for e in logs
             if e["event"] == "layer_transition" and e["layer"] == layer]
    assert steps == RELOAD_QKV
    assert logs[-1]["event"] == "push_complete"


def graded(rows: int, cols: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A seeded normal bf16 ``[rows, cols]`` whose magnitude spans 100x down the rows and
    across the columns: every 128x128 tile and 1x128 group has its own scale, so a scale
    read from the wrong tile shows."""
    gen = torch.Generator(device).manual_seed(seed)
    grade = (torch.logspace(-1, 1, rows, device=device)[:, None]
             * torch.logspace(1, -1, cols, device=device)[None, :])
    return (torch.randn(rows, cols, generator=gen, device=device) * grade).bfloat16()


def emulate_block_scaled_mm(a, scale_a, q, scale_b, m):
    """What cuBLASLt computes from ``F.scaled_mm``'s 1x128 x 128x128 operands, in float64:
    ``a[i, k] * scale_a[i, k // 128]`` times ``q[j, k] * scale_b[k // 128, j // 128]``,
    for the first ``m`` rows of ``a``."""
    groups = q.shape[1] // 128
    a_deq = a[:m].double() * scale_a[:m].double().repeat_interleave(128, dim=1)
    tiles = scale_b[:groups].t().double()                        # [N/128, K/128]
    w_deq = q.double() * tiles.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return a_deq @ w_deq.t()


def experts_reference(experts, x, topk_ids, config):
    """The stacked experts' forward for top-1 routing, from their own dequantized weights
    (what an FP8 experts kernel must agree with)."""
    from loadfsm.quant import dequantize_fp8
    ref = torch.zeros_like(x)
    for e in range(experts.gate_up_proj.shape[0]):
        rows = topk_ids[:, 0] == e
        w1 = dequantize_fp8(experts.gate_up_proj[e], experts.gate_up_proj_scale[e], config)
        w2 = dequantize_fp8(experts.down_proj[e], experts.down_proj_scale[e], config)
        g, u = (x[rows] @ w1.t()).chunk(2, dim=-1)
        ref[rows] = (torch.nn.functional.silu(g) * u) @ w2.t()
    return ref


def captured(fn, static_x):
    """``(graph, static_out)``: ``fn(static_x)`` warmed up on a side stream, then captured
    into a CUDA graph (replay after writing new values into ``static_x``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_x)  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out
