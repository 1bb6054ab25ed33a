"""A load against the physical limits it is judged by, measured in the same run (issue 12).

    python benchmarks/load_anchors.py --dir CKPT [--model llama-8b] [--device cuda]
                                      [--repeat 3] [--cold] [--json]

Warm (page cache filled first), the sides interleaved each round, every warm round first:
  loadfsm       ``loadfsm.load(quant=...)`` of the checkpoint, GB/s of checkpoint bytes
  pinned_h2d    ``copy_`` of a 1 GiB pinned host buffer to the device, as many times as
                the checkpoint has GiB (CUDA only): the host-to-device limit
  seq_read      one thread reading every shard in 16 MiB ``readinto`` calls (no device)
Cold (``--cold``: the page cache dropped before each side, which needs root to write
``/proc/sys/vm/drop_caches``; skipped with a note otherwise):
  loadfsm_cold, seq_read_cold, par_read_cold (16 threads of 64 MiB ``preadv``)
The ratios are the issue's rows: ``loadfsm / pinned_h2d`` (goal 0.8), ``loadfsm_cold /
seq_read_cold`` (goal 1.0), and the CUDA peak over final + largest layer (goal <= 1.0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loadfsm.api import load
from loadfsm.loading import default_device
from loadfsm.testing import build_model

GIB = 1 << 30
READ_CHUNK = 16 << 20
PAR_CHUNK, PAR_THREADS = 64 << 20, 16
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seq_read(files: list[Path]) -> None:
    buffer = memoryview(bytearray(READ_CHUNK))
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def par_read(files: list[Path]) -> None:
    def one(job):
        path, offset, nbytes = job
        buffer = memoryview(bytearray(min(PAR_CHUNK, nbytes)))
        fd = os.open(path, os.O_RDONLY)
        try:
            while nbytes > 0:
                got = os.preadv(fd, [buffer[:min(len(buffer), nbytes)]], offset)
                if not got:
                    break
                offset, nbytes = offset + got, nbytes - got
        finally:
            os.close(fd)
    jobs = [(path, at, min(PAR_CHUNK, path.stat().st_size - at))
            for path in files for at in range(0, path.stat().st_size, PAR_CHUNK)]
    with ThreadPoolExecutor(PAR_THREADS) as pool:
        list(pool.map(one, jobs))


def pinned_h2d(total: int, device: torch.device):
    """A function copying ``total`` bytes host -> device through one pinned GiB."""
    host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(GIB, dtype=torch.uint8, device=device)
    rounds, rest = divmod(total, GIB)

    def copy():
        for _ in range(rounds):
            target.copy_(host, non_blocking=True)
        if rest:
            target[:rest].copy_(host[:rest], non_blocking=True)
        _sync(device)
    return copy


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


class LoadSide:
    """``loadfsm.load`` of the checkpoint into a fresh model; keeps the last report."""

    def __init__(self, model: str, directory: Path, device: torch.device, quant: str):
        self.model, self.directory, self.device, self.quant = model, directory, device, quant
        self.report = None

    def __call__(self) -> None:
        self.report = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(self.model)
        self.report = load(model, self.directory, quant=self.quant, device=self.device)
        _sync(self.device)


def _timed(fn, cold: bool) -> float:
    if cold:
        drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(model: str, directory: Path, device: torch.device, quant: str, repeat: int,
          cold: bool) -> dict:
    files = _shards(directory)
    total = sum(f.stat().st_size for f in files)
    ours = LoadSide(model, directory, device, quant)
    warm_sides = {"loadfsm": ours, "seq_read": lambda: seq_read(files)}
    if device.type == "cuda":
        warm_sides["pinned_h2d"] = pinned_h2d(total, device)
    cold_sides = {"loadfsm_cold": ours, "seq_read_cold": lambda: seq_read(files),
                  "par_read_cold": lambda: par_read(files)}
    cold = cold and can_drop_caches()
    ours()                     # kernels, libraries and CUDA ready; the page cache filled
    seconds: dict[str, list[float]] = {}
    peaks = []
    for _ in range(repeat):      # every warm round before the first page cache drop
        for name, fn in warm_sides.items():
            seconds.setdefault(name, []).append(_timed(fn, cold=False))
        peaks.append(ours.report.cuda_peak_bytes)
    for _ in range(repeat if cold else 0):
        for name, fn in cold_sides.items():
            seconds.setdefault(name, []).append(_timed(fn, cold=True))
    report = ours.report
    result = {"model": model, "device": str(device), "quant": quant, "checkpoint_bytes": total,
              "repeat": repeat, "cold": "measured" if cold else "skipped (needs root to "
              "drop the page cache: --cold as root)",
              "final_bytes": report.final_bytes, "largest_layer_bytes": report.largest_layer_bytes}
    for name, samples in seconds.items():
        median = statistics.median(samples)
        result[name] = {"seconds": median, "gb_per_s": total / median / 1e9,
                        "samples_s": samples}
    ratios = {}
    if "pinned_h2d" in result:
        ratios["loadfsm_over_pinned_h2d"] = (result["loadfsm"]["gb_per_s"]
                                             / result["pinned_h2d"]["gb_per_s"])
    if cold:
        ratios["loadfsm_cold_over_seq_read_cold"] = (result["loadfsm_cold"]["gb_per_s"]
                                                     / result["seq_read_cold"]["gb_per_s"])
        ratios["loadfsm_cold_over_par_read_cold"] = (result["loadfsm_cold"]["gb_per_s"]
                                                     / result["par_read_cold"]["gb_per_s"])
    if peaks[-1] is not None:
        result["cuda_peak_bytes"] = max(peaks)
        ratios["cuda_peak_over_final_plus_largest"] = (
            max(peaks) / (report.final_bytes + report.largest_layer_bytes))
    result["ratios"] = ratios
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['model']} on {r['device']}, quant={r['quant']}, checkpoint "
             f"{r['checkpoint_bytes'] / 1e9:.3f} GB, median of {r['repeat']}; cold: {r['cold']}",
             "| side | seconds | GB/s |", "|---|---|---|"]
    lines += [f"| {name} | {r[name]['seconds']:.3f} | {r[name]['gb_per_s']:.2f} |"
              for name in ("loadfsm", "pinned_h2d", "seq_read", "loadfsm_cold",
                           "seq_read_cold", "par_read_cold") if name in r]
    lines += [f"{name}: {value:.3f}" for name, value in r["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/load_anchors.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="a checkpoint of --model's shapes")
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    result = bench(args.model, Path(args.dir), device, args.quant, args.repeat, args.cold)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
