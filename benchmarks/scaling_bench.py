"""Scaling benchmark: the costs the unit tests bound by counting work, here timed.

    python benchmarks/scaling_bench.py [--repeat 3] [--json] [--only planning]

  push      WeightSync.push of k layers of an n-layer model (many 16x16 linears, FP8):
            8 of 8, 8 of 512, 512 of 512; linear cost gives few_of_many ~ 1x the baseline
            and all_of_many ~ 64x (tests/test_weight_sync.py counts it)
  planning  LoadSession over 1,000 and 100,000 one-norm layers: linear gives ~100x
            (tests/test_states.py counts it); and at 100,000 the same followed by a
            full gc.collect(): planning holds the collector's full passes back, this
            pays the one it left (an upper bound: it scans the model's objects too);
            and in CPU seconds of the process (a shared machine distorts them least)
  in_flight an FP8 load of a one-layer MoE whose arrivals interleave every layer, at 32,
            256 and 1,024 experts: seconds per added arrival between the sizes; O(1) per
            arrival keeps high/low ~ 1 (tests/test_in_flight.py counts it)
Times are the best of ``--repeat`` runs on CPU; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace

import torch
from torch import nn

import loadfsm
from loadfsm.testing import CONFIGS, build_model, reference_state_dict


class ManyLinears(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(n))


class ManyNorms(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.LayerNorm(2) for _ in range(n))


def _best(fn, repeat: int, clock=time.perf_counter) -> float:
    """Fastest of ``repeat`` calls; what ``fn`` returns is freed after the clock stops."""
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        result = fn()
        best = min(best, clock() - start)
        del result
    return best


def bench_push(repeat: int) -> dict:
    def loaded(n):
        with torch.device("meta"):
            model = ManyLinears(n)
        items = [(f"layers.{i}.weight", torch.randn(16, 16, dtype=torch.bfloat16))
                 for i in range(n)]
        sync = loadfsm.WeightSync(model, session=loadfsm.load(model, items, quant="fp8",
                                                              device="cpu"))
        sync.push(items)                              # warm-up
        return sync, items

    (small, small_items), (big, big_items) = loaded(8), loaded(512)
    baseline = _best(lambda: small.push(small_items), repeat)
    few = _best(lambda: big.push(big_items[:8]), repeat)
    every = _best(lambda: big.push(big_items), repeat)
    return {"baseline_s": baseline, "few_of_many_s": few, "all_of_many_s": every,
            "few_of_many_ratio": few / baseline, "all_of_many_ratio": every / baseline}


def bench_planning(repeat: int) -> dict:
    def plan(n, collect=False, clock=time.perf_counter):
        with torch.device("meta"):
            model = ManyNorms(n)

        def once():
            session = loadfsm.LoadSession(model, device="cpu")
            if collect:
                gc.collect()
            return session

        return _best(once, repeat, clock)

    small, large = plan(1_000), plan(100_000)
    return {"layers_1k_s": small, "layers_100k_s": large, "ratio": large / small,
            "layers_100k_then_full_gc_s": plan(100_000, collect=True),
            # CPU seconds of this process: what a machine shared with other jobs distorts least
            "layers_100k_cpu_s": plan(100_000, clock=time.process_time)}


def _moe(experts: int):
    return replace(CONFIGS["tiny-moe"], vocab_size=128, hidden_size=32, intermediate_size=32,
                   num_layers=1, num_heads=2, num_kv_heads=1, head_dim=None, max_seq_len=8,
                   num_experts=experts, experts_per_token=2, moe_intermediate_size=16)


def _interleaved(model: nn.Module, state: dict) -> list:
    """The tensors reordered: the first of every module's tensors, then every second..."""
    modules = dict(model.named_modules())
    queues: dict[str, list] = {}
    for name, tensor in state.items():
        owner = name
        while owner and owner not in modules:
            owner = owner.rpartition(".")[0]
        queues.setdefault(owner, []).append((name, tensor))
    lists = list(queues.values())
    return [q[i] for i in range(max(map(len, lists))) for q in lists if i < len(q)]


def _load_seconds(config, stream) -> float:
    model = build_model(config)                       # built outside the clock
    start = time.perf_counter()
    loadfsm.load(model, stream, quant="fp8", device="cpu", max_in_flight=1000)
    return time.perf_counter() - start


def bench_in_flight(repeat: int) -> dict:
    points = []
    for experts in (32, 256, 1024):
        config = _moe(experts)
        stream = _interleaved(build_model(config), reference_state_dict(config))
        seconds = min(_load_seconds(config, stream) for _ in range(repeat))
        points.append((len(stream), seconds))
    (n1, t1), (n2, t2), (n3, t3) = points
    low, high = (t2 - t1) / (n2 - n1), (t3 - t2) / (n3 - n2)
    return {"arrivals": [n for n, _ in points], "seconds": [t for _, t in points],
            "low_s_per_arrival": low, "high_s_per_arrival": high, "ratio": high / low}


_BENCHES = {"push": bench_push, "planning": bench_planning, "in_flight": bench_in_flight}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scaling_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", action="append", choices=sorted(_BENCHES),
                        help="run this one (repeatable); default: all")
    args = parser.parse_args(argv)
    result = {name: bench(args.repeat) for name, bench in _BENCHES.items()
              if not args.only or name in args.only}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
