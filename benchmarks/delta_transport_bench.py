"""Delta push vs full push over ``torch.distributed`` (gloo on the CPU), in one run.

    python benchmarks/delta_transport_bench.py [--model tiny] [--layers 16] [--mode layers]
                                               [--changed 0.02] [--repeat 5] [--json]

Two processes: rank 0 the trainer (the reference model in bf16, seeded random weights),
rank 1 the engine (the same model loaded with online FP8, other weights). Before each
timed push (untimed) the trainer scales ``--changed`` of its decoder layers (``--mode
tiles``: of the 128x128 tiles of its FP8 weights; engine in 128x128 blocks) by 1.01, as
``delta_bench.py`` does. Then, timed on the trainer from the push's start until both
ranks passed a barrier after it (the engine applied it):
  full    ``WeightSender`` -> ``WeightReceiver``: every bf16 tensor sent, quantized by
          the engine
  delta   ``DeltaSender`` -> ``DeltaReceiver``: the trainer quantizes, compares with what
          it last sent and sends the changed layers (or tiles with their scales)
The full pushes run first, then the delta pushes (a full push between deltas would make
the engine refuse the next delta as built on another base). After both phases the engine
is compared with a fresh engine given one in-process push of the trainer's weights: they
must be bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.reload.delta import DeltaPush
from loadfsm.testing import CONFIGS, build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from delta_bench import TILE, _layer_nudge, _tile_nudge  # noqa: E402

BUCKET_BYTES = 4 << 20


def _timed(step, repeat: int, nudge=None) -> list[float]:
    times = []
    for _ in range(repeat):
        if nudge is not None:
            nudge()
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return times


def _trainer(config, quant, tiles: bool, args) -> dict:
    trainer = build_model(config)
    loadfsm.load(trainer, None, load_format="dummy", seed=1, device="cpu")
    full = loadfsm.WeightSender(bucket_bytes=BUCKET_BYTES)
    delta = DeltaPush(quant, build_model(config), tiles=tiles)
    sender = loadfsm.DeltaSender(delta, bucket_bytes=BUCKET_BYTES)
    nudge, changed = (_tile_nudge(trainer, delta, args.changed) if tiles
                      else _layer_nudge(trainer, args.changed))
    step = 0

    def full_push():
        nonlocal step
        step += 1
        full(trainer.named_parameters())

    def delta_push():
        nonlocal step
        step += 1
        sender(trainer, version=step)

    full_push()                                         # warm-up
    full_s = _timed(full_push, args.repeat, nudge)
    delta_push()                                        # the first delta push is whole
    delta_s = _timed(delta_push, args.repeat, nudge)
    torch.save(trainer.state_dict(), f"{args.tmp}/trainer.pt")
    report = sender.report
    return {**changed, "full_s": statistics.median(full_s),
            "delta_s": statistics.median(delta_s), "bytes_sent": report.bytes_sent,
            "bytes_skipped": report.bytes_skipped, "tiles_sent": report.tiles_sent,
            "tiles_total": report.tiles_total}


def _engine(config, quant, args) -> dict:
    model = build_model(config)
    loadfsm.load(model, None, load_format="dummy", seed=0, quant=quant, device="cpu")
    sync = loadfsm.WeightSync(model)
    full, delta = loadfsm.WeightReceiver(sync), loadfsm.DeltaReceiver(sync)
    full.receive()
    _timed(full.receive, args.repeat)
    delta.receive()
    _timed(delta.receive, args.repeat)
    dist.barrier()                                      # the trainer saved its weights
    fresh = build_model(config)
    loadfsm.load(fresh, None, load_format="dummy", seed=2, quant=quant, device="cpu")
    loadfsm.WeightSync(fresh).push(torch.load(f"{args.tmp}/trainer.pt").items())
    expected = fresh.state_dict()
    return {"bit_identical": all(
        torch.equal(t.view(torch.uint8) if t.dim() else t,
                    expected[n].view(torch.uint8) if t.dim() else expected[n])
        for n, t in model.state_dict().items())}


def _worker(rank: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{args.tmp}/store", rank=rank,
                            world_size=2)
    config = CONFIGS[args.model]
    config = replace(config, num_layers=args.layers or config.num_layers)
    tiles = args.mode == "tiles"
    quant = Fp8Config(granularity="block", block_size=TILE) if tiles else Fp8Config()
    if rank == 0:
        out = _trainer(config, quant, tiles, args)
        dist.barrier()
    else:
        out = _engine(config, quant, args)
    torch.save(out, f"{args.tmp}/out{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/delta_transport_bench.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--mode", choices=("layers", "tiles"), default="layers")
    parser.add_argument("--changed", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loadfsm-delta-") as tmp:
        args.tmp = tmp
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(args,), nprocs=2, join=True)
        trainer, engine = torch.load(f"{tmp}/out0.pt"), torch.load(f"{tmp}/out1.pt")
    result = {"model": args.model, "layers": args.layers, "mode": args.mode,
              "transport": "gloo", **trainer, **engine,
              "full_over_delta": trainer["full_s"] / trainer["delta_s"]}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
