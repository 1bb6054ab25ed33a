"""Weight-push benchmark, baselines side by side in one run.

    python benchmarks/sync_bench.py [--model llama-8b-4l] [--transport gloo|nccl]

In-process (weights already on the device):
  push        WeightSync.push of every checkpoint tensor: requantize in place
  copy        a plain ``copy_`` of the same bytes into same-sized bf16 tensors
  eager       the torch reference FP8 quantization of the same tensors (no Triton)
Transport (two processes, ``--transport gloo|nccl``):
  sender/receiver  WeightSender -> WeightReceiver -> WeightSync.push
  broadcast        bare ``dist.broadcast`` of buckets of the same size
Throughput is GB/s of bf16 input; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loadfsm.api import load, planned_entries
from loadfsm.quant.config import resolve_quant
from loadfsm.quant.fp8 import quantize_fp8_reference
from loadfsm import LoadSession
from loadfsm.loading import default_device
from loadfsm.sync import WeightSync
from loadfsm.testing import build_model


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int) -> float:
    fn()                                   # warm-up: kernels compiled, allocator primed
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trainer_tensors(model_name: str, device, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor of the model, random bf16, already on ``device``."""
    session = LoadSession(build_model(model_name), device=device)
    gen = torch.Generator(device).manual_seed(seed)
    return [(name, (torch.randn(e.shape, generator=gen, device=device, dtype=torch.float32)
                    * 0.02).to(e.dtype)) for name, e in planned_entries(session).items()]


def bench_in_process(model_name: str, device, quant: str, repeat: int) -> dict:
    model = build_model(model_name)
    load(model, None, load_format="dummy", quant=quant, device=device)
    sync = WeightSync(model)
    tensors = trainer_tensors(model_name, device)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    targets = [torch.empty_like(t) for _, t in tensors]
    config = resolve_quant(quant)
    quantized = [t for _, t in tensors if t.dim() >= 2]
    timings = {
        "push": _timed(lambda: sync.push(tensors), device, repeat),
        "copy": _timed(lambda: [d.copy_(s) for d, (_, s) in zip(targets, tensors)],
                       device, repeat),
        "eager": _timed(lambda: [quantize_fp8_reference(t, config) for t in quantized],
                        device, repeat),
    }
    eager_bytes = sum(t.numel() * t.element_size() for t in quantized)
    result = {"bytes": nbytes, "quant": quant}
    for key, seconds in timings.items():
        moved = eager_bytes if key == "eager" else nbytes
        result[key] = {"seconds": seconds, "gb_per_s": moved / seconds / 1e9}
    result["push_over_copy"] = result["push"]["gb_per_s"] / result["copy"]["gb_per_s"]
    result["push_over_eager"] = result["push"]["gb_per_s"] / result["eager"]["gb_per_s"]
    return result


def _transport_worker(rank: int, world: int, args: dict, init_file: str, out_file: str):
    from loadfsm.reload.transport import WeightReceiver, WeightSender
    backend = args["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    tensors = trainer_tensors(args["model"], device)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    bucket_bytes = args["bucket_mb"] << 20
    n_buckets = max(1, -(-nbytes // bucket_bytes))
    bucket = torch.empty(bucket_bytes, dtype=torch.uint8, device=device)
    if rank == 0:
        hook = WeightSender(bucket_bytes=bucket_bytes)
        run = lambda: hook(tensors)  # noqa: E731
    else:
        model = build_model(args["model"])
        load(model, None, load_format="dummy", quant=args["quant"], device=device)
        receiver = WeightReceiver(WeightSync(model))
        run = receiver.receive
    bare = lambda: [dist.broadcast(bucket, 0) for _ in range(n_buckets)]  # noqa: E731
    timings = {}
    for key, fn in (("sender_receiver", run), ("broadcast", bare)):
        dist.barrier()
        timings[key] = _timed(fn, device, args["repeat"])
    if rank == 1:
        with open(out_file, "w") as f:
            json.dump({"bytes": nbytes, "backend": backend, "bucket_mb": args["bucket_mb"],
                       **{k: {"seconds": s, "gb_per_s": nbytes / s / 1e9}
                          for k, s in timings.items()}}, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_transport(model_name: str, quant: str, backend: str, bucket_mb: int,
                    repeat: int) -> dict:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        args = {"model": model_name, "quant": quant, "backend": backend,
                "bucket_mb": bucket_mb, "repeat": repeat}
        mp.spawn(_transport_worker, args=(2, args, init, out), nprocs=2, join=True)
        with open(out) as f:
            result = json.load(f)
    result["receiver_over_broadcast"] = (result["sender_receiver"]["gb_per_s"]
                                         / result["broadcast"]["gb_per_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/sync_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--transport", choices=["none", "gloo", "nccl"], default="none")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    result = {"model": args.model, "device": str(device),
              "in_process": bench_in_process(args.model, device, args.quant, args.repeat)}
    if args.transport != "none":
        result["transport"] = bench_transport(args.model, args.quant, args.transport,
                                              args.bucket_mb, max(1, args.repeat // 2))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
