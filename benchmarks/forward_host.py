"""Host time against device time of one Llama-8B layer's FP8 linears, eager, on a GPU.

    python benchmarks/forward_host.py [--tokens 2048] [--granularity block] [--iters 50]

The four linears (qkv, o, gate_up, down) called back to back ``--iters`` times: the
seconds until the loop returns (the host's share) and until the device is done, per
layer, for ``Fp8Linear`` and bf16 ``F.linear``. Where the host time reaches the wall
time, the forward is bound by Python and launches, not by the GEMMs
(``forward_bench.py`` gives the speeds alone).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from loadfsm.quant import Fp8Config, Fp8Linear, quantize_fp8

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}


def _per_layer(fn, iters: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / iters, (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/forward_host.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--granularity", default="block",
                        choices=("tensor", "channel", "block"))
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    config = Fp8Config(granularity=args.granularity, exclude=())
    modules, weights, inputs = [], [], []
    for k, n in SHAPES.values():
        x = torch.randn(args.tokens, k, device="cuda").to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        modules.append(Fp8Linear.from_quantized(*quantize_fp8(w, config), None, config,
                                                out_dtype=torch.bfloat16))
        weights.append(w)
        inputs.append(x)
    with torch.no_grad():
        fp8 = _per_layer(lambda: [m(x) for m, x in zip(modules, inputs)], args.iters)
        bf16 = _per_layer(lambda: [F.linear(x, w) for w, x in zip(weights, inputs)],
                          args.iters)
    for name, (host, wall) in (("fp8 " + args.granularity, fp8), ("bf16", bf16)):
        print(f"{name:12s} host {host * 1e6:7.0f} us/layer   wall {wall * 1e6:7.0f} us/layer")
    print(f"fp8 speed over bf16: {bf16[1] / fp8[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
