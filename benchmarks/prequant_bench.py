"""Pre-quantized FP8 against online FP8, for loads and for pushes, in one run.

    python benchmarks/prequant_bench.py [--model llama-8b-4l] [--device cuda]
        [--granularity block] [--repeat 3] [--dir /tmp/prequant] [--json]

One model's weights, two checkpoints: the bf16 one and the FP8 one a trainer's
``quantize_for_push`` makes of the same weights (the layout the granularity publishes:
block -> DeepSeek-V3 naming, channel -> compressed-tensors, tensor -> ModelOpt).
  load online      loadfsm.load(bf16 checkpoint, quant=granularity)
  load prequant    loadfsm.load(FP8 checkpoint): FP8 codes and scales installed as they are
  push bf16        WeightSync.push(trainer bf16 parameters) into the online-loaded engine
  push prequant    WeightSync.push(quantize_for_push(...)) into the prequant-loaded engine
  trainer quantize quantize_for_push itself (the trainer's cost, on the same device)
GB/s is bytes read (loads) or received (pushes) per second; peaks are the ledger's and,
on CUDA, torch.cuda.max_memory_allocated above the start. Ratios are what to compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import loadfsm
from loadfsm.loading import default_device
from loadfsm.quant.config import Fp8Config
from loadfsm.testing import build_model, write_checkpoint
from loadfsm.testing.fp8_checkpoint import write_fp8_checkpoint

LAYOUT = {"block": "deepseek", "channel": "compressed-tensors", "tensor": "modelopt"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm(path: Path) -> None:
    """Read every file once, so each load starts from the page cache alike."""
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def _load(model_name: str, path: Path, config: Fp8Config, device: torch.device):
    model = build_model(model_name)
    gc.collect()
    report = loadfsm.load(model, path, quant=config, device=device)
    return model, report


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(model_name: str, device: torch.device, granularity: str, repeat: int,
        root: Path) -> dict:
    config = Fp8Config(granularity=granularity)
    bf16_dir = write_checkpoint(model_name, root / "bf16", max_shard_bytes=1 << 30)
    trainer, _ = _load(model_name, bf16_dir, None, device)          # bf16, on the device
    fp8_dir = write_fp8_checkpoint(dict(loadfsm.quantize_for_push(trainer, config)),
                                   root / "fp8", layout=LAYOUT[granularity],
                                   block_size=config.block_size)
    _warm(bf16_dir)
    _warm(fp8_dir)
    loads = {"online": [], "prequant": []}
    for _ in range(repeat):                  # interleaved, so drift hits both alike
        for key, path in (("online", bf16_dir), ("prequant", fp8_dir)):
            model, report = _load(model_name, path, config, device)
            loads[key].append(report)
            del model
    engines = {"online": _load(model_name, bf16_dir, config, device)[0],
               "prequant": _load(model_name, fp8_dir, config, device)[0]}
    bf16_push = list(trainer.named_parameters())
    quantize_s = statistics.median(
        _timed(lambda: list(loadfsm.quantize_for_push(trainer, config)), device)
        for _ in range(repeat))
    fp8_push = list(loadfsm.quantize_for_push(trainer, config))
    syncs = {"online": loadfsm.WeightSync(engines["online"]),
             "prequant": loadfsm.WeightSync(engines["prequant"])}
    pushes = {"online": [], "prequant": []}
    for _ in range(repeat + 1):                                     # the first warms up
        pushes["online"].append(syncs["online"].push(bf16_push))
        pushes["prequant"].append(syncs["prequant"].push(fp8_push))
    result = {"model": model_name, "device": str(device), "granularity": granularity}
    for key, reports in loads.items():
        seconds = statistics.median(r.seconds for r in reports)
        result[f"load_{key}"] = {
            "seconds": round(seconds, 4), "gb_s": round(reports[0].bytes_read / seconds / 1e9, 3),
            "bytes_read": reports[0].bytes_read, "peak_bytes": reports[0].peak_bytes,
            "final_bytes": reports[0].final_bytes,
            "largest_layer_bytes": reports[0].largest_layer_bytes,
            "cuda_peak_bytes": reports[0].cuda_peak_bytes}
    for key, reports in pushes.items():
        seconds = statistics.median(r.seconds for r in reports[1:])
        result[f"push_{key}"] = {
            "seconds": round(seconds, 4),
            "gb_s": round(reports[1].bytes_received / seconds / 1e9, 3),
            "bytes_received": reports[1].bytes_received,
            "peak_extra_bytes": reports[1].peak_extra_bytes}
    result["trainer_quantize_seconds"] = round(quantize_s, 4)
    result["push_bytes_ratio"] = round(result["push_prequant"]["bytes_received"]
                                       / result["push_online"]["bytes_received"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--granularity", default="block", choices=sorted(LAYOUT))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the two checkpoints")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        result = run(args.model, device, args.granularity, args.repeat, Path(root))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:26s} {value}")


if __name__ == "__main__":
    main()
