"""Delta push vs full push: 2% of the layers changed (issue 11, item 3).

    python benchmarks/delta_bench.py [--model tiny] [--layers 16] [--changed 0.02]
                                     [--device cpu] [--repeat 5] [--json]

The engine: the reference Llama with ``--layers`` decoder layers, online FP8, in this
process; the trainer: a bf16 copy of it on the same device. Each timed step scales the
weights of ``--changed`` of the engine's layers (at least one) by 1.01, then pushes:
  full    ``WeightSync.push(trainer.named_parameters())``
  delta   ``DeltaPush.push``: compare every parameter with what was last sent, quantize
          the moved ones, push the layers whose FP8 bytes changed
Both end bit-identical (checked once). Times are medians after a warm-up;
``full_over_delta`` is the speed-up, ``bytes_skipped`` what the delta did not push.
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
from loadfsm.testing import CONFIGS, build_model, load_reference_model, reference_state_dict


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(config, device):
    model = build_model(config)
    loadfsm.load(model, reference_state_dict(config, 0).items(), quant="fp8", device=device)
    return model, loadfsm.WeightSync(model)


def _timed(step, device, repeat: int) -> float:
    step()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/delta_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--changed", type=float, default=0.02)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = replace(CONFIGS[args.model], num_layers=args.layers)
    (ours, sync), (full, full_sync) = _engine(config, device), _engine(config, device)
    trainer = load_reference_model(config, seed=1).to(device)
    params = dict(trainer.named_parameters())
    layers = sorted({n.rpartition(".")[0] for n in params})
    count = max(1, round(args.changed * len(layers)))
    chosen = layers[len(layers) // 2:len(layers) // 2 + count]
    moved = [p for n, p in params.items() if n.rpartition(".")[0] in chosen]

    def nudge():
        with torch.no_grad():
            for p in moved:
                p.mul_(1.01)

    delta = DeltaPush(Fp8Config(), sync)
    delta.push(sync, trainer)                       # the first push is full
    full_sync.push(trainer.named_parameters())
    seconds = {"delta": _timed(lambda: (nudge(), delta.push(sync, trainer)), device,
                               args.repeat),
               "full": _timed(lambda: (nudge(), full_sync.push(trainer.named_parameters())),
                              device, args.repeat)}
    nudge()
    delta.push(sync, trainer)
    full_sync.push(trainer.named_parameters())
    identical = all(torch.equal(a.view(torch.uint8) if a.dim() else a,
                                b.view(torch.uint8) if b.dim() else b)
                    for a, b in zip(ours.state_dict().values(), full.state_dict().values()))
    report = delta.report
    result = {"model": args.model, "layers": len(layers), "changed_layers": count,
              "device": str(device), "full_s": round(seconds["full"], 4),
              "delta_s": round(seconds["delta"], 4),
              "full_over_delta": round(seconds["full"] / seconds["delta"], 2),
              "bytes_sent": report.bytes_sent, "bytes_skipped": report.bytes_skipped,
              "bit_identical": identical}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
