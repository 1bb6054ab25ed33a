"""FP8 quantization bandwidth on CUDA: ``quantize_fp8_into`` (the Triton kernels where
available) at each granularity, in TB/s of bf16 input.

    python benchmarks/quant_bench.py [--size 16384] [--repeat 10] [--json]

The weight is ``size x size`` bf16, large enough that Python launch overhead does not
dominate; compare the figure with the GPU's memory bandwidth (the kernel reads 2 bytes and
writes 1 per element).
"""

from __future__ import annotations

import argparse
import json

import torch

from loadfsm.quant import Fp8Config, quantize_fp8, quantize_fp8_into, triton_available

GRANULARITIES = ("tensor", "channel", "block")


def bandwidth(size: int, repeat: int) -> dict[str, float]:
    """Granularity -> TB/s of bf16 input read by ``quantize_fp8_into``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(size, size, generator=gen, device="cuda").to(torch.bfloat16)
    result = {}
    for granularity in GRANULARITIES:
        config = Fp8Config(granularity=granularity, block_size=(128, 128))
        q, scale = quantize_fp8(w, config)                 # outputs, and a warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            quantize_fp8_into(w, q, scale, config)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeat
        result[granularity] = w.numel() * w.element_size() / seconds / 1e12
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/quant_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs CUDA")
    result = {"device": torch.cuda.get_device_name(), "triton": triton_available("cuda"),
              "tb_per_s": bandwidth(args.size, args.repeat)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
