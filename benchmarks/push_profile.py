"""Where one in-process push's time goes on a GPU: host vs device, and the device's kernels.

    python benchmarks/push_profile.py [--model llama-8b-4l] [--quant fp8] [--top 10]

Loads the model (dummy weights, online FP8) and pushes ``sync_bench``'s trainer tensors:
three pushes to warm, then the median of nine of the push's wall time and of the time
until ``push`` returns to Python (the host's share: when it is close to the wall time,
the host issues work no faster than the device runs it), then one push under
``torch.profiler``: the device time summed over kernels and copies, and the largest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loadfsm.api import load
from loadfsm.sync import WeightSync
from loadfsm.testing import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_bench import trainer_tensors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/push_profile.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-8b-4l")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    model = build_model(args.model)
    load(model, None, load_format="dummy", quant=args.quant, device=device)
    sync = WeightSync(model)
    tensors = trainer_tensors(args.model, device)
    nbytes = sum(t.nbytes for _, t in tensors)
    for _ in range(3):
        sync.push(tensors)
    walls, hosts = [], []
    for _ in range(9):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sync.push(tensors)
        returned = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        hosts.append(returned - start)
    wall = statistics.median(walls)
    print(f"push {wall * 1e3:.2f} ms ({nbytes / wall / 1e9:.0f} GB/s of bf16 input), "
          f"returned after {statistics.median(hosts) * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sync.push(tensors)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"device time {sum(e.self_device_time_total for e in events) / 1e3:.2f} ms")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:4d}  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
