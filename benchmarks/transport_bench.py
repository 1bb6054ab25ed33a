"""torch.distributed transport: one sender vs two, and a bare broadcast of the same bytes.

    python benchmarks/transport_bench.py [--model tiny|moe] [--backend gloo|nccl]
                                         [--bucket-mb 32] [--repeat 3] [--json]

Three processes: ranks 0 and 1 are trainers, rank 2 the engine (FP8, dummy-loaded).
  single     rank 0 sends every tensor (group {0, 2}); rank 2 receives and applies
  multi      ranks 0 and 1 each send the layers they own (alternate layers; world group)
  broadcast  bare ``dist.broadcast`` of buckets of the same total size from rank 0
             (group {0, 2}): the wire alone
``--model moe``: the per-name case, 24 layers x 128 experts x 3 tensors (the shapes of
``push_names_bench.py``). Times are the engine's ``receive()`` (push applied), the fastest
of ``--repeat`` after a warm-up; ``multi_over_single`` > 1 means two senders are faster.
With NCCL each rank takes the GPU of its rank (three GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loadfsm import WeightSync, load
from loadfsm.reload.transport import WeightReceiver, WeightSender
from loadfsm.testing import build_model

from push_names_bench import expert_tensors, moe_config
from sync_bench import trainer_tensors


def _layer_of(name: str) -> int:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


def _config(model: str):
    return moe_config(24, 128) if model == "moe" else model


def _tensors(model: str, device):
    if model == "moe":
        return expert_tensors(_config(model), device)
    return trainer_tensors(model, device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, args: dict, init_file: str, out_file: str) -> None:
    backend = args["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=3)
    pair = dist.new_group([0, 2])
    bucket_bytes = args["bucket_mb"] << 20
    tensors = _tensors(args["model"], device) if rank < 2 else None
    mine = [(n, t) for n, t in tensors if _layer_of(n) % 2 == rank] if rank < 2 else None
    if rank == 2:
        model = build_model(_config(args["model"]))
        load(model, None, load_format="dummy", quant="fp8", device=device)
        sync = WeightSync(model)
        receivers = {"single": WeightReceiver(sync, group=pair, src=0),
                     "multi": WeightReceiver(sync, src=[0, 1])}
    runs = {
        "single": {0: lambda: WeightSender(group=pair, src=0, bucket_bytes=bucket_bytes),
                   2: None},
        "multi": {0: lambda: WeightSender(src=0, senders=[0, 1], bucket_bytes=bucket_bytes),
                  1: lambda: WeightSender(src=1, senders=[0, 1], bucket_bytes=bucket_bytes),
                  2: None},
    }
    best = {}
    for key, roles in runs.items():
        if rank not in roles:
            for _ in range(args["repeat"] + 1):
                dist.barrier()
            continue
        if rank == 2:
            fn = receivers[key].receive
        else:
            sender = roles[rank]()
            payload = tensors if key == "single" else mine
            fn = lambda sender=sender, payload=payload: sender(payload)  # noqa: E731
        times = []
        for _ in range(args["repeat"] + 1):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        best[key] = min(times[1:])
    if rank != 1:
        count = max(1, -(-args["total"] // bucket_bytes))
        bucket = torch.empty(min(bucket_bytes, args["total"]), dtype=torch.uint8,
                             device=device)
        times = []
        for _ in range(args["repeat"] + 1):
            _sync(device)
            start = time.perf_counter()
            for _ in range(count):
                dist.broadcast(bucket, 0, group=pair)
            _sync(device)
            times.append(time.perf_counter() - start)
        best["broadcast"] = min(times[1:])
    dist.barrier()
    if rank == 2:
        with open(out_file, "w") as f:
            json.dump({"bytes": args["total"], "seconds": best}, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/transport_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--bucket-mb", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    total = sum(t.numel() * t.element_size()
                for _, t in _tensors(args.model, torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        config = {"model": args.model, "backend": args.backend, "bucket_mb": args.bucket_mb,
                  "repeat": args.repeat, "total": total}
        mp.spawn(_worker, args=(config, init, out), nprocs=3, join=True)
        with open(out) as f:
            data = json.load(f)
    seconds = data["seconds"]
    result = {"model": args.model, "backend": args.backend, "bytes": data["bytes"],
              **{k: {"seconds": round(s, 4), "gb_per_s": round(data["bytes"] / s / 1e9, 3)}
                 for k, s in seconds.items()},
              "multi_over_single": round(seconds["single"] / seconds["multi"], 3),
              "single_over_broadcast": round(seconds["broadcast"] / seconds["single"], 3)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
