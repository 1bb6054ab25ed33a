"""What the observability hooks cost a load: tracing to a file and the profiler ranges
when no profiler runs. Interleaved repeats, median seconds per load; CPU or CUDA; from
dummy weights, or (``--checkpoint DIR``, written first if absent) a safetensors file.

    python benchmarks/trace_overhead.py --model tiny --repeats 15
    python benchmarks/trace_overhead.py --model llama-8b-4l --device cuda --checkpoint /tmp/c
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import loadfsm
import loadfsm.session
from loadfsm.testing import build_model, write_checkpoint


def _load(args, trace=None) -> float:
    model = build_model(args.model)
    t0 = time.perf_counter()
    loadfsm.load(model, args.checkpoint, load_format="auto" if args.checkpoint else "dummy",
                 quant="fp8", device=args.device, trace=trace)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    if args.checkpoint is not None and not args.checkpoint.exists():
        write_checkpoint(args.model, args.checkpoint)
    real = loadfsm.session.layer_range
    bare = nullcontext()
    times: dict[str, list[float]] = {"plain": [], "no profiler hook": [], "trace file": []}
    with tempfile.TemporaryDirectory() as tmp:
        _load(args)                                                     # warm-up
        for _ in range(args.repeats):
            times["plain"].append(_load(args))
            loadfsm.session.layer_range = lambda layer, step: bare
            try:
                times["no profiler hook"].append(_load(args))
            finally:
                loadfsm.session.layer_range = real
            times["trace file"].append(_load(args, trace=Path(tmp) / "t.jsonl"))
    base = statistics.median(times["plain"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:18} {med * 1e3:9.2f} ms  ({(med / base - 1) * 100:+.2f}% vs plain)")


if __name__ == "__main__":
    main()
