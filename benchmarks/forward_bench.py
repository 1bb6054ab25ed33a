"""FP8 forward against bf16 ``F.linear`` on Llama-8B's linear shapes, side by side.

    python benchmarks/forward_bench.py [--tokens 2048,8192] [--repeat 20] [--json]

One decoder layer's four GEMMs (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096) at each token count: bf16 ``F.linear`` and ``Fp8Linear`` at each
granularity, timed with CUDA events, eagerly and replayed from a CUDA graph (what an
engine's decode and piecewise prefill graphs run). Printed as speed over bf16 (> 1 is
faster); the activation quantization is inside the FP8 time. ``--json`` also names the
kernel each granularity ran (``quant.linear.fp8_kernel``): 128x128 blocks run
``F.scaled_mm``'s block recipe on sm90 (``block_scaled_mm``), the dequantizing fallback
elsewhere.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from loadfsm.quant import Fp8Config, Fp8Linear, quantize_fp8
from loadfsm.quant.linear import fp8_kernel

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
GRANULARITIES = ("tensor", "channel", "block")


def _time(fn, repeat: int, graph: bool) -> float:
    """Seconds per call of ``fn``."""
    for _ in range(3):
        fn()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        call = cuda_graph.replay
    else:
        call = fn
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def bench(tokens: int, repeat: int, graph: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    seconds = {"bf16": 0.0, **{g: 0.0 for g in GRANULARITIES}}
    kernels = {g: set() for g in GRANULARITIES}
    for k, n in SHAPES.values():
        x = torch.randn(tokens, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        seconds["bf16"] += _time(lambda: F.linear(x, w), repeat, graph)
        for granularity in GRANULARITIES:
            config = Fp8Config(granularity=granularity, exclude=())
            q, scale = quantize_fp8(w, config)
            module = Fp8Linear.from_quantized(q, scale, None, config, out_dtype=torch.bfloat16)
            kernels[granularity].add(fp8_kernel(x, q, config, torch.bfloat16).__name__)
            with torch.no_grad():
                seconds[granularity] += _time(lambda: module(x), repeat, graph)
    return {"tokens": tokens, "graph": graph, "layer_seconds": seconds,
            "speed_over_bf16": {g: seconds["bf16"] / seconds[g] for g in GRANULARITIES},
            "kernels": {g: sorted(names) for g, names in kernels.items()}}


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = [bench(int(t), args.repeat, graph) for t in args.tokens.split(",")
               for graph in (False, True)]
    for r in results:
        print(json.dumps(r) if args.json else
              f"{r['tokens']:6} tokens {'graph' if r['graph'] else 'eager'}: " + ", ".join(
                  f"{g} {v:.2f}x" for g, v in r["speed_over_bf16"].items()))
    return results


if __name__ == "__main__":
    main()
