"""INT8 weight-only matmul paths and quantization bandwidth, on CUDA or CPU.

    python benchmarks/int8_bench.py [--device cuda] [--n 4096] [--k 4096] [--json]

For each batch of activation rows: microseconds of ``Int8Linear``'s own path
(``int8_matmul``), of its fallback forced (int8 -> bf16 ``F.linear``, scale after), of
torch's ``_weight_int8pack_mm`` where this torch has it for the device, and of bf16
``F.linear`` on the full-precision weight; and the GB/s of ``quantize_int8`` (bf16 read).
The first tells whether ``use_int8pack_mm`` picks the faster path on this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from loadfsm.quant import int8 as int8_module
from loadfsm.quant.int8 import int8_matmul, quantize_int8

ROWS = (1, 4, 8, 16, 64, 512)


def _seconds(fn, device: torch.device, repeat: int) -> float:
    fn()                                                  # warm-up
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    start_s = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start_s) / repeat


def _fallback(x, q, scale):
    limit = int8_module.INT8PACK_MAX_ROWS
    int8_module.INT8PACK_MAX_ROWS = 0
    try:
        return int8_matmul(x, q, scale, None, torch.bfloat16)
    finally:
        int8_module.INT8PACK_MAX_ROWS = limit


def _torch_kernel(x, q, scale):
    try:
        torch._weight_int8pack_mm(x, q, scale.view(-1))
    except (AttributeError, RuntimeError):               # NotImplementedError included
        return None
    return lambda: torch._weight_int8pack_mm(x, q, scale.view(-1))


def measure(device: torch.device, n: int, k: int, repeat: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    q, scale = quantize_int8(w)
    quant_s = _seconds(lambda: quantize_int8(w), device, repeat)
    rows = {}
    for m in ROWS:
        x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
        kernel = _torch_kernel(x, q, scale)
        timings = {
            "int8_matmul": _seconds(lambda: int8_matmul(x, q, scale, None, torch.bfloat16),
                                    device, repeat),
            "fallback": _seconds(lambda: _fallback(x, q, scale), device, repeat),
            "torch_int8pack_mm": None if kernel is None else _seconds(kernel, device, repeat),
            "bf16_linear": _seconds(lambda: F.linear(x, w), device, repeat),
        }
        rows[m] = {name: None if s is None else round(s * 1e6, 1) for name, s in timings.items()}
        rows[m]["uses_int8pack_mm"] = int8_module.use_int8pack_mm(x, q, scale)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": [n, k], "quantize_gb_per_s": round(w.numel() * 2 / quant_s / 1e9, 1),
            "microseconds_by_rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/int8_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(torch.device(args.device), args.n, args.k, args.repeat)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
