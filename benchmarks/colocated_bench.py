"""Colocated push benchmark: trainer and engine in two processes on one device.

    python benchmarks/colocated_bench.py [--model tiny|llama-8b-4l|llama-8b|small:N]
                                         [--device cuda] [--buckets 2]

Side by side in one run, the same bf16 tensors each time:
  in_process  WeightSync.push in the engine's own process (tensors already on the device)
  colocated   a trainer process -> ColocatedSender -> shared buckets -> ColocatedReceiver
              -> WeightSync.push (CUDA IPC on a GPU, memfd shared memory on CPU)
  ipc_copy    the same transport, the engine only copying each view into a same-sized
              tensor: moving the bytes between the processes, no push
  checksum    layer_checksums of the engine after the push (GB/s of its live bytes)
GB/s of bf16 input (median of ``--repeat``, the three alternating); ratios are what to
compare. On one GPU both processes share device 0. ``--model small:N``: only the IPC
copy of N tensors of 1 KB, in microseconds per tensor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch

import loadfsm
from loadfsm import ColocatedReceiver, ColocatedSender, LoadSession
from loadfsm.loading.drive import planned_entries
from loadfsm.reload.checksum import layer_checksums
from loadfsm.testing import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_tensors(model_name: str, device, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor of the model, random bf16, on ``device`` (same in both
    processes: seeded); ``small:N``: N tensors of 1 KB (what the transport costs per
    tensor, as with many experts)."""
    if model_name.startswith("small:"):
        return [(f"t{i}", torch.full((256,), float(i), device=device))
                for i in range(int(model_name[len("small:"):]))]
    session = LoadSession(build_model(model_name), device=device)
    gen = torch.Generator(device).manual_seed(seed)
    return [(name, (torch.randn(e.shape, generator=gen, device=device, dtype=torch.float32)
                    * 0.02).to(e.dtype)) for name, e in planned_entries(session).items()]


def _trainer(conn, control, model_name: str, device: str, bucket_mb: int, buckets: int):
    """Push every time the engine says go; stop on ``None``."""
    device = torch.device(device)
    tensors = trainer_tensors(model_name, device)
    _sync(device)
    sender = ColocatedSender(conn, bucket_bytes=bucket_mb << 20, buckets=buckets,
                             device=device)
    control.send("ready")
    while control.recv() is not None:
        sender(tensors)
    sender.close()


class _CopySink:
    """Stands in for a ``WeightSync``: copies each arriving view into its own tensor."""

    def __init__(self, tensors, device):
        self.targets = {name: torch.empty_like(t) for name, t in tensors}
        self.session, self.device = None, device

    def push(self, arrivals, version=None):
        for name, view in arrivals:
            self.targets[name].copy_(view, non_blocking=True)


def _timed(fns: dict, device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, run in turn ``repeat`` times (alternating, so a
    busy machine slows them alike)."""
    for fn in fns.values():
        fn()                               # warm-up: buckets shared, kernels compiled
    times = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(seconds) for key, seconds in times.items()}


def _start_trainer(args):
    """The trainer process, the engine's end of its connection, and its control end."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    control, their_control = ctx.Pipe()
    trainer = ctx.Process(target=_trainer, args=(theirs, their_control, args.model,
                                                  args.device, args.bucket_mb, args.buckets))
    trainer.start()
    theirs.close()
    their_control.close()
    control.recv()                         # the trainer's tensors are ready
    return trainer, ours, control


def run_small(args) -> dict:
    """``--model small:N``: only the IPC copy of N tensors of 1 KB, per tensor."""
    device = torch.device(args.device)
    tensors = trainer_tensors(args.model, device)
    trainer, ours, control = _start_trainer(args)
    receiver = ColocatedReceiver(_CopySink(tensors, device), ours, stall_warning_s=None)

    def ipc_copy():
        control.send("go")
        receiver.receive()

    try:
        seconds = _timed({"ipc_copy": ipc_copy}, device, args.repeat)["ipc_copy"]
    finally:
        control.send(None)
        trainer.join(timeout=120)
        receiver.close()
    return {"model": args.model, "device": str(device), "bucket_mb": args.bucket_mb,
            "buckets": args.buckets, "ipc_copy_s": round(seconds, 6),
            "us_per_tensor": round(seconds / len(tensors) * 1e6, 2)}


def run(args) -> dict:
    if args.model.startswith("small:"):
        return run_small(args)
    device = torch.device(args.device)
    model = build_model(args.model)
    loadfsm.load(model, None, load_format="dummy", quant=args.quant, device=device)
    sync = loadfsm.WeightSync(model)
    tensors = trainer_tensors(args.model, device)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    trainer, ours, control = _start_trainer(args)
    receiver = ColocatedReceiver(sync, ours, stall_warning_s=None)
    sink = _CopySink(tensors, device)

    def colocated(target):
        receiver.sync = target
        control.send("go")
        receiver.receive()

    try:
        timings = _timed({"in_process": lambda: sync.push(tensors),
                          "colocated": lambda: colocated(sync),
                          "ipc_copy": lambda: colocated(sink)}, device, args.repeat)
        checksum_s = _timed({"checksum": lambda: layer_checksums(sync)}, device,
                            args.repeat)["checksum"]
    finally:
        control.send(None)
        trainer.join(timeout=120)
        receiver.close()
    result = {"model": args.model, "device": str(device), "quant": args.quant,
              "bytes": nbytes, "bucket_mb": args.bucket_mb, "buckets": args.buckets}
    for key, seconds in timings.items():
        result[f"{key}_s"] = round(seconds, 6)
        result[f"{key}_gbps"] = round(nbytes / seconds / 1e9, 3)
    live = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result.update(checksum_s=round(checksum_s, 6), live_bytes=live,
                  checksum_gbps=round(live / checksum_s / 1e9, 3))
    result["colocated_vs_in_process"] = round(timings["in_process"] / timings["colocated"], 3)
    result["colocated_vs_ipc_copy"] = round(timings["ipc_copy"] / timings["colocated"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--buckets", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line, nothing else")
    args = parser.parse_args()
    result = run(args)
    if args.json or "us_per_tensor" in result:
        print(json.dumps(result))
        return
    gb = result["bytes"] / 1e9
    print(f"{args.model} on {result['device']}, {gb:.3f} GB of bf16, quant={args.quant}, "
          f"{args.buckets} x {args.bucket_mb} MB buckets")
    for key in ("in_process", "colocated", "ipc_copy"):
        print(f"  {key:11} {result[f'{key}_s'] * 1e3:9.1f} ms  {result[f'{key}_gbps']:8.2f} GB/s")
    print(f"  checksum    {result['checksum_s'] * 1e3:9.1f} ms  {result['checksum_gbps']:8.2f} GB/s"
          f" of {result['live_bytes'] / 1e9:.3f} GB live")
    print(f"  colocated / in-process: {result['colocated_vs_in_process']:.2f}x   "
          f"colocated / ipc copy: {result['colocated_vs_ipc_copy']:.2f}x")


if __name__ == "__main__":
    main()
