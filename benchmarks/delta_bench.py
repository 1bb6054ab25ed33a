"""Delta push vs full push in one run: 2% of the layers, or of the FP8 tiles, changed
(issue 11, item 3).

    python benchmarks/delta_bench.py [--model tiny|llama-8b-4l] [--layers N]
                                     [--mode layers|tiles] [--changed 0.02]
                                     [--device cpu] [--repeat 5] [--json]

The engine: the reference Llama (``--layers`` decoder layers; default the model's own,
16 for tiny) with seeded random weights (the dummy format), loaded with online FP8 in this
process (``--mode tiles``: block FP8, 128x128); the trainer: the same model in bf16 with
other random weights, on the same device. Before each timed push
(untimed) the trainer scales, by 1.01,
  layers  the weights of ``--changed`` of the engine's layers (at least one);
  tiles   ``--changed`` of the 128x128 tiles of the FP8 weights (at least one), picked
          at random once (seed 0) over every FP8 weight; each such tile's scale moves.
Then the timed push, of one engine each:
  full    ``WeightSync.push(trainer.named_parameters())``: bf16, quantized by the engine
  delta   ``DeltaPush.push``: compare every parameter with what was last sent (tiles:
          tile by tile), quantize what moved, push the layers (tiles: the tiles with
          their scales, written in place) whose FP8 bytes or scales changed
Both engines end bit-identical (checked once). Times are medians after a warm-up;
``full_over_delta`` is the speed-up; ``bytes_*`` are the delta's, against what the full
push carries; ``tiles_sent`` of ``tiles_total`` went as patches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

import loadfsm
from loadfsm.quant.config import Fp8Config
from loadfsm.reload.delta import DeltaPush
from loadfsm.reload.tiles import gather_tiles, put_tiles
from loadfsm.testing import CONFIGS, build_model

TILE = (128, 128)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(config, quant, device):
    """An engine with seeded random weights made on the device (the dummy format: a
    Llama-scale reference state generated on the host took minutes)."""
    model = build_model(config)
    loadfsm.load(model, None, load_format="dummy", seed=0, quant=quant, device=device)
    return model, loadfsm.WeightSync(model)


def _timed(prepare, step, device, repeat: int) -> float:
    """Median seconds of ``step`` over ``repeat`` runs after a warm-up; ``prepare`` runs
    untimed before each."""
    prepare()
    step()
    times = []
    for _ in range(repeat):
        prepare()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer_nudge(trainer, changed: float):
    """Scale the parameters of ``changed`` of the layers (the middle ones) by 1.01."""
    params = dict(trainer.named_parameters())
    layers = sorted({n.rpartition(".")[0] for n in params})
    count = max(1, round(changed * len(layers)))
    chosen = layers[len(layers) // 2:len(layers) // 2 + count]
    moved = [p for n, p in params.items() if n.rpartition(".")[0] in chosen]

    def nudge():
        with torch.no_grad():
            for p in moved:
                p.mul_(1.01)
    return nudge, {"layers_changed": count, "layers_total": len(layers)}


def _tile_nudge(trainer, delta: DeltaPush, changed: float):
    """Scale ``changed`` of the FP8 weights' tiles, drawn at random once, by 1.01."""
    weights = [(p, torch.ones(*p.shape[:-2], -(-p.shape[-2] // TILE[0]),
                              -(-p.shape[-1] // TILE[1]), device=p.device).nonzero())
               for n, p in trainer.named_parameters()
               if delta._tiles.place(n, p.shape) is not None]
    total = sum(len(index) for _, index in weights)
    count = max(1, round(changed * total))
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count]
    chosen, start = [], 0
    for p, index in weights:
        mine = pick[(pick >= start) & (pick < start + len(index))] - start
        if len(mine):
            chosen.append((p, index[mine.to(index.device)]))
        start += len(index)

    def nudge():
        with torch.no_grad():
            for p, index in chosen:
                put_tiles(p, index, gather_tiles(p, index, TILE) * 1.01, TILE)
    return nudge, {"tiles_changed": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/delta_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, llama-8b-4l (GPU), ...")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the model's own; 16 for tiny)")
    parser.add_argument("--mode", choices=("layers", "tiles"), default="layers")
    parser.add_argument("--changed", type=float, default=0.02)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = CONFIGS[args.model]
    layers = args.layers or (16 if args.model == "tiny" else config.num_layers)
    config = replace(config, num_layers=layers)
    tiles = args.mode == "tiles"
    quant = Fp8Config(granularity="block", block_size=TILE) if tiles else Fp8Config()
    (ours, sync), (full, full_sync) = _engine(config, quant, device), _engine(config, quant,
                                                                             device)
    trainer = build_model(config)
    loadfsm.load(trainer, None, load_format="dummy", seed=1, device=device)
    delta = DeltaPush(quant, sync, tiles=tiles)
    nudge, changed = (_tile_nudge(trainer, delta, args.changed) if tiles
                      else _layer_nudge(trainer, args.changed))
    delta.push(sync, trainer)                       # the first push is full
    full_sync.push(trainer.named_parameters())
    seconds = {"delta": _timed(nudge, lambda: delta.push(sync, trainer), device, args.repeat),
               "full": _timed(nudge, lambda: full_sync.push(trainer.named_parameters()),
                              device, args.repeat)}
    nudge()
    delta.push(sync, trainer)
    full_sync.push(trainer.named_parameters())
    identical = all(torch.equal(a.view(torch.uint8) if a.dim() else a,
                                b.view(torch.uint8) if b.dim() else b)
                    for a, b in zip(ours.state_dict().values(), full.state_dict().values()))
    report = delta.report
    result = {"model": args.model, "mode": args.mode, "layers": layers, **changed,
              "device": str(device), "full_s": round(seconds["full"], 4),
              "delta_s": round(seconds["delta"], 4),
              "full_over_delta": round(seconds["full"] / seconds["delta"], 2),
              "bytes_sent": report.bytes_sent, "bytes_skipped": report.bytes_skipped,
              "tiles_sent": report.tiles_sent, "tiles_total": report.tiles_total,
              "bit_identical": identical}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
