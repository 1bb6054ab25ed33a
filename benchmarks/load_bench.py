"""Load benchmark: loadfsm against the baselines, side by side in one run.

    python benchmarks/load_bench.py [--model llama-8b-4l] [--device cuda] [--repeat 3]

Methods, each on the same checkpoint, page cache warmed first, repeated and
interleaved so drift hits all alike:
  load_file   safetensors.torch.load_file(device=...) of every shard (no model, no quant)
  naive       bf16 model loaded whole, then every linear quantized (bf16 freed per layer)
  loadfsm     loadfsm.load(quant=...), layer by layer
Memory is torch.cuda.max_memory_allocated on CUDA, the session ledger on CPU
(load_file: the bytes it returns). Ratios are what to compare; seconds are noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from loadfsm.api import load
from loadfsm.quant.config import resolve_quant
from loadfsm.quant.fp8 import quantize_fp8
from loadfsm.quant.linear import Fp8Linear
from loadfsm.loading import default_device
from loadfsm.testing import as_config, build_model, write_checkpoint


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _warm(path: Path) -> int:
    total = 0
    for file in _files(path):
        with open(file, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


class _Peak:
    """Peak device bytes above the level at entry (CUDA), else filled in by the method."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        self.seconds = time.perf_counter() - self._t0


def run_load_file(path, device, quant):
    with _Peak(device) as peak:
        tensors = {}
        for file in _files(path):
            tensors.update(load_file(str(file), device=str(device)))
    peak.bytes = peak.bytes if peak.bytes is not None else sum(
        t.numel() * t.element_size() for t in tensors.values())
    return peak, sum(t.numel() * t.element_size() for t in tensors.values())


def run_naive(path, device, quant, model_name):
    config = resolve_quant(quant)
    with _Peak(device) as peak:
        model = build_model(model_name)
        report = load(model, path, quant=None, device=device)
        bf16_bytes, largest_out = report.final_bytes, 0
        del report                  # its session (a reference cycle) would keep the bf16
        gc.collect()                # modules alive through the quantization loop
        linears = [name for name, module in model.named_modules()
                   if type(module) is torch.nn.Linear and not config.excludes(name)]
        for name in linears:                  # each bf16 weight freed once quantized
            module = model.get_submodule(name)
            q, scale = quantize_fp8(module.weight.data, config)
            largest_out = max(largest_out, q.numel() + scale.numel() * 4)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    Fp8Linear.from_quantized(q, scale, module.bias, config,
                                             out_dtype=module.weight.dtype))
            del module, q, scale
        final = sum(p.numel() * p.element_size() for p in model.parameters())
    if peak.bytes is None:
        peak.bytes = bf16_bytes + largest_out
    return peak, final


def run_loadfsm(path, device, quant, model_name):
    with _Peak(device) as peak:
        model = build_model(model_name)
        report = load(model, path, quant=quant, device=device)
    if peak.bytes is None:
        peak.bytes = report.peak_bytes
    return peak, report


def bench(model_name, directory: Path, device: torch.device, quant: str,
          repeat: int, label: str | None = None) -> dict:
    file_bytes = _warm(directory)
    runs: dict[str, list] = {"load_file": [], "naive": [], "loadfsm": []}
    extra = {}
    for _ in range(repeat):
        peak, _ = run_load_file(directory, device, quant)
        runs["load_file"].append((peak.seconds, peak.bytes))
        gc.collect()
        peak, naive_final = run_naive(directory, device, quant, model_name)
        runs["naive"].append((peak.seconds, peak.bytes))
        gc.collect()
        peak, report = run_loadfsm(directory, device, quant, model_name)
        runs["loadfsm"].append((peak.seconds, peak.bytes))
        extra = {"final_bytes": report.final_bytes,
                 "largest_layer_bytes": report.largest_layer_bytes,
                 "ledger_peak_bytes": report.peak_bytes}
        gc.collect()
    result = {"model": label or str(model_name), "layers": as_config(model_name).num_layers,
              "device": str(device), "quant": quant,
              "checkpoint_bytes": file_bytes, "repeat": repeat, **extra}
    for method, samples in runs.items():
        seconds = statistics.median(s for s, _ in samples)
        result[method] = {"seconds": seconds, "gb_per_s": file_bytes / seconds / 1e9,
                          "peak_bytes": max(b for _, b in samples)}
    fsm, naive, plain = result["loadfsm"], result["naive"], result["load_file"]
    result["ratios"] = {
        "loadfsm_speed_vs_load_file": plain["seconds"] / fsm["seconds"],
        "loadfsm_speed_vs_naive": naive["seconds"] / fsm["seconds"],
        "naive_peak_over_loadfsm_peak": naive["peak_bytes"] / fsm["peak_bytes"],
        "loadfsm_peak_over_final_plus_largest":
            fsm["peak_bytes"] / (extra["final_bytes"] + extra["largest_layer_bytes"]),
    }
    return result


def format_result(r: dict) -> str:
    gb = lambda n: f"{n / 1e9:.3f} GB"  # noqa: E731
    lines = [f"{r['model']} on {r['device']}, quant={r['quant']}, checkpoint "
             f"{gb(r['checkpoint_bytes'])}, median of {r['repeat']}",
             "| method | seconds | GB/s | peak |", "|---|---|---|---|"]
    for method in ("load_file", "naive", "loadfsm"):
        m = r[method]
        lines.append(f"| {method} | {m['seconds']:.3f} | {m['gb_per_s']:.2f} | "
                     f"{gb(m['peak_bytes'])} |")
    lines.append(f"final {gb(r['final_bytes'])}, largest layer {gb(r['largest_layer_bytes'])}")
    lines += [f"{k}: {v:.3f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/load_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="reference model (llama-8b-4l on GPU)")
    parser.add_argument("--dir", default=None, help="checkpoint dir (written if empty)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the model's number of decoder layers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    model = as_config(args.model)
    if args.layers is not None:
        model = replace(model, num_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="loadfsm-bench-") as tmp:
        directory = Path(args.dir or tmp)
        if not _files(directory):
            write_checkpoint(model, directory, max_shard_bytes=5 << 30)
        result = bench(model, directory, device, args.quant, args.repeat,
                       label=f"{args.model} ({model.num_layers} layers)")
    print(json.dumps(result) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
