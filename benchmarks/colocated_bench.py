"""Colocated push benchmark: trainer and engine in two processes on one device.

    python benchmarks/colocated_bench.py [--model tiny|llama-8b-4l|llama-8b|small:N]
                                         [--device cuda] [--buckets 2] [--bucket-only]
                                         [--direct-min-mb MB[,MB...]]

Side by side in one run, the same bf16 tensors each time:
  in_process  WeightSync.push in the engine's own process (tensors already on the device)
  colocated   a trainer process -> ColocatedSender -> ColocatedReceiver -> WeightSync.push:
              tensors of at least ``--direct-min-mb`` (default: the bucket size) read in
              place from the trainer's storage, the rest through shared buckets (CUDA IPC
              on a GPU, shared memory on CPU)
  ipc_copy    the same transport, the engine only copying each view into a same-sized
              tensor: moving the bytes between the processes, no push
  colocated_buckets, ipc_copy_buckets  (``--bucket-only``) the same with every tensor
              through a bucket (``direct_min_bytes=math.inf``, the transport before direct
              shares)
  colocated_direct<MB>, ipc_copy_direct<MB>  each further ``--direct-min-mb`` threshold
  checksum    layer_checksums of the engine after the push (GB/s of its live bytes)
GB/s of bf16 input (median of ``--repeat``, all alternating); ratios are what to
compare. On one GPU both processes share device 0. ``--model small:N``: only the IPC
copy of N tensors of 1 KB, in microseconds per tensor (``--direct-min-mb 0.001``: each
read in place, the per-tensor cost of a direct share).
"""

from __future__ import annotations

import argparse
import json
import math
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


def _trainer(conns, control, model_name: str, device: str, bucket_mb: int, buckets: int,
             direct_min: list[float]):
    """Push through sender ``i`` (``direct_min[i]``) every time the engine says ``i``;
    stop on ``None``."""
    device = torch.device(device)
    tensors = trainer_tensors(model_name, device)
    _sync(device)
    senders = [ColocatedSender(conn, bucket_bytes=bucket_mb << 20, buckets=buckets,
                               device=device, direct_min_bytes=least)
               for conn, least in zip(conns, direct_min)]
    control.send("ready")
    while (which := control.recv()) is not None:
        senders[which](tensors)
    for sender in senders:
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
    for _ in range(2):       # buckets shared, kernels compiled; the second push maps
        for fn in fns.values():          # the trainer's storages for good
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(seconds) for key, seconds in times.items()}


def _variants(args) -> dict[str, float]:
    """Suffix of each colocated variant -> its ``direct_min_bytes``."""
    mbs = [float(mb) for mb in (args.direct_min_mb or str(args.bucket_mb)).split(",")]
    variants = {"": max(1, int(mbs[0] * (1 << 20)))}
    variants.update((f"_direct{mb:g}mb", max(1, int(mb * (1 << 20)))) for mb in mbs[1:])
    if args.bucket_only:
        variants["_buckets"] = math.inf
    return variants


def _start_trainer(args, variants: dict[str, float]):
    """The trainer process, the engine's end of each variant's connection, and the
    control end."""
    ctx = multiprocessing.get_context("spawn")
    pairs = [ctx.Pipe() for _ in variants]
    control, their_control = ctx.Pipe()
    trainer = ctx.Process(target=_trainer, args=(
        [theirs for _, theirs in pairs], their_control, args.model, args.device,
        args.bucket_mb, args.buckets, list(variants.values())))
    trainer.start()
    for _, theirs in pairs:
        theirs.close()
    their_control.close()
    control.recv()                         # the trainer's tensors are ready
    return trainer, [ours for ours, _ in pairs], control


def _pushed(control, receivers, which: int, target) -> None:
    """One push through variant ``which`` into ``target``."""
    receivers[which].sync = target
    control.send(which)
    receivers[which].receive()


def run_small(args) -> dict:
    """``--model small:N``: only the IPC copy of N tensors of 1 KB, per tensor."""
    device = torch.device(args.device)
    tensors = trainer_tensors(args.model, device)
    variants = _variants(args)
    trainer, conns, control = _start_trainer(args, variants)
    sink = _CopySink(tensors, device)
    receivers = [ColocatedReceiver(sink, conn, stall_warning_s=None) for conn in conns]
    try:
        timings = _timed({f"ipc_copy{suffix}": (lambda i=i: _pushed(control, receivers, i, sink))
                          for i, suffix in enumerate(variants)}, device, args.repeat)
    finally:
        _stop_trainer(trainer, control, receivers)
    result = {"model": args.model, "device": str(device), "bucket_mb": args.bucket_mb,
              "buckets": args.buckets, "direct_min_bytes": variants[""]}
    for key, seconds in timings.items():
        result[f"{key}_s"] = round(seconds, 6)
        result[f"{key}_us_per_tensor"] = round(seconds / len(tensors) * 1e6, 2)
    return result


def _stop_trainer(trainer, control, receivers) -> None:
    """Tell the trainer process to exit, wait for it, close the engine's receivers."""
    control.send(None)
    trainer.join(timeout=120)
    for receiver in receivers:
        receiver.close()


def run(args) -> dict:
    if args.model.startswith("small:"):
        return run_small(args)
    device = torch.device(args.device)
    model = build_model(args.model)
    loadfsm.load(model, None, load_format="dummy", quant=args.quant, device=device)
    sync = loadfsm.WeightSync(model)
    tensors = trainer_tensors(args.model, device)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    variants = _variants(args)
    trainer, conns, control = _start_trainer(args, variants)
    receivers = [ColocatedReceiver(sync, conn, stall_warning_s=None) for conn in conns]
    sink = _CopySink(tensors, device)
    fns = {"in_process": lambda: sync.push(tensors)}
    for i, suffix in enumerate(variants):
        fns[f"colocated{suffix}"] = lambda i=i: _pushed(control, receivers, i, sync)
        fns[f"ipc_copy{suffix}"] = lambda i=i: _pushed(control, receivers, i, sink)
    try:
        timings = _timed(fns, device, args.repeat)
        checksum_s = _timed({"checksum": lambda: layer_checksums(sync)}, device,
                            args.repeat)["checksum"]
    finally:
        _stop_trainer(trainer, control, receivers)
    result = {"model": args.model, "device": str(device), "quant": args.quant,
              "bytes": nbytes, "bucket_mb": args.bucket_mb, "buckets": args.buckets,
              "direct_min_bytes": variants[""],
              "direct_bytes": sum(t.nbytes for _, t in tensors if t.nbytes >= variants[""])}
    for key, seconds in timings.items():
        result[f"{key}_s"] = round(seconds, 6)
        result[f"{key}_gbps"] = round(nbytes / seconds / 1e9, 3)
    live = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result.update(checksum_s=round(checksum_s, 6), live_bytes=live,
                  checksum_gbps=round(live / checksum_s / 1e9, 3))
    for suffix in variants:
        colocated = timings[f"colocated{suffix}"]
        result[f"colocated{suffix}_vs_in_process"] = round(timings["in_process"] / colocated, 3)
        result[f"colocated{suffix}_vs_ipc_copy"] = round(timings[f"ipc_copy{suffix}"]
                                                         / colocated, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--buckets", type=int, default=2)
    parser.add_argument("--direct-min-mb", default=None,
                        help="tensors of at least this many MB are read in place from the "
                             "trainer's storage (default: --bucket-mb); a comma-separated "
                             "list times each, side by side")
    parser.add_argument("--bucket-only", action="store_true",
                        help="also time every tensor through a bucket, side by side")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON line, nothing else")
    args = parser.parse_args()
    result = run(args)
    if args.json or "bytes" not in result:
        print(json.dumps(result))
        return
    suffixes = list(_variants(args))
    print(f"{args.model} on {result['device']}, {result['bytes'] / 1e9:.3f} GB of bf16, "
          f"quant={args.quant}, {args.buckets} x {args.bucket_mb} MB buckets; "
          f"{result['direct_bytes'] / 1e9:.3f} GB in tensors of >= "
          f"{result['direct_min_bytes'] / (1 << 20):g} MB read in place")
    for key in ["in_process"] + [f"{kind}{suffix}" for suffix in suffixes
                                 for kind in ("colocated", "ipc_copy")]:
        print(f"  {key:22} {result[f'{key}_s'] * 1e3:9.1f} ms  "
              f"{result[f'{key}_gbps']:8.2f} GB/s")
    print(f"  {'checksum':22} {result['checksum_s'] * 1e3:9.1f} ms  "
          f"{result['checksum_gbps']:8.2f} GB/s of {result['live_bytes'] / 1e9:.3f} GB live")
    for suffix in suffixes:
        print(f"  colocated{suffix} / in-process: "
              f"{result[f'colocated{suffix}_vs_in_process']:.2f}x   "
              f"/ ipc_copy{suffix}: {result[f'colocated{suffix}_vs_ipc_copy']:.2f}x")


if __name__ == "__main__":
    main()
