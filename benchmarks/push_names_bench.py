"""Per-name cost of a push: many small expert tensors (issue 11, item 5).

    python benchmarks/push_names_bench.py [--layers 168] [--experts 128] [--device cpu]
                                          [--repeat 3] [--profile] [--json]

The model: the reference MoE decoder with ``--layers`` MoE blocks of ``--experts`` experts
(Qwen3-30B-A3B's per-expert shapes, hidden 2048 x intermediate 768, scaled down 32x to
64 x 24 so it runs on a CPU), loaded in FP8 (per-expert scales). The push: every expert
tensor in checkpoint order, ``layers x experts x 3`` names (64,512 by default), tracing off.

  push_s       ``WeightSync.push`` of those tensors (R1..R4)
  floor_s      the same kernel work in a tight loop, with no loadfsm code: per layer, one
               ``copy_`` per tensor into a view of a staging pair (views made outside the
               clock, the pair reused by every layer), one row max|x| per staging
               tensor from ``aminmax`` (the exact NaN/Inf check the push runs),
               ``quantize_fp8`` of each stacked weight with the engine's config, and the
               ``copy_`` of the results into the live tensors
  us_per_tensor  (push_s - floor_s) / tensors: the CPU bookkeeping per name (routing, the
               layer machine, making the views, checks, the commit), the figure issue 11
               bounds at 10 us

``--profile`` prints the cProfile of one push (top 25 by own time). Push and floor runs
alternate, after a warm-up; each figure is the fastest of ``--repeat`` runs (the machine
is shared: the fastest run is the one least disturbed).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from dataclasses import replace

import torch

import loadfsm
from loadfsm.quant.fp8 import quantize_fp8
from loadfsm.testing import CONFIGS, build_model


def moe_config(layers: int, experts: int, hidden: int = 64, intermediate: int = 24):
    return replace(CONFIGS["tiny-moe"], vocab_size=128, hidden_size=hidden,
                   intermediate_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                   head_dim=None, max_seq_len=8, num_experts=experts, experts_per_token=2,
                   moe_intermediate_size=intermediate)


def expert_tensors(config, device, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """Every expert tensor of the model, random bf16 on ``device``, layer by layer."""
    gen = torch.Generator(device).manual_seed(seed)
    h, i = config.hidden_size, config.moe_intermediate_size
    out = []
    for layer in range(config.num_layers):
        for e in range(config.num_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)),
                                ("down_proj", (h, i))):
                w = torch.randn(shape, generator=gen, device=device) * 0.02
                out.append((f"{prefix}{proj}.weight", w.to(torch.bfloat16)))
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(fns: dict, device, repeat: int) -> dict:
    """The fastest of ``repeat`` runs of each function, the functions alternating."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def floor(model, config, tensors, device, quant):
    """The kernel work of the push with no bookkeeping; returns the function to time."""
    per_layer, e_count = 3 * config.num_experts, config.num_experts
    h, i = config.hidden_size, config.moe_intermediate_size
    layers = [(model.get_submodule(f"model.layers.{index}.mlp.experts"),
               [t for _, t in tensors[index * per_layer:(index + 1) * per_layer]])
              for index in range(config.num_layers)]
    # One staging pair, its views made here, outside the clock, and reused by every layer.
    gate_up = torch.empty(e_count, 2 * i, h, dtype=torch.bfloat16, device=device)
    down = torch.empty(e_count, h, i, dtype=torch.bfloat16, device=device)
    views = [v for e in range(e_count) for v in (gate_up[e, :i], gate_up[e, i:], down[e])]

    def run():
        for experts, chunk in layers:
            for view, tensor in zip(views, chunk):
                view.copy_(tensor)
            for staged in (gate_up, down):
                low, high = torch.aminmax(staged, dim=-1)
                torch.maximum(high, low.neg()).mul(0).sum()
            for attr, staged in (("gate_up_proj", gate_up), ("down_proj", down)):
                q, scale = quantize_fp8(staged, quant)
                getattr(experts, attr).data.copy_(q)
                getattr(experts, f"{attr}_scale").data.copy_(scale)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/push_names_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=168)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = moe_config(args.layers, args.experts)
    model = build_model(config)
    loadfsm.load(model, None, load_format="dummy", quant="fp8", device=device)
    sync = loadfsm.WeightSync(model)
    tensors = expert_tensors(config, device)
    best = _fastest({"push": lambda: sync.push(tensors),
                     "floor": floor(model, config, tensors, device, sync.session.quant)},
                    device, args.repeat)
    push_s, floor_s = best["push"], best["floor"]
    n = len(tensors)
    result = {"tensors": n, "device": str(device), "push_s": round(push_s, 4),
              "floor_s": round(floor_s, 4),
              "us_per_tensor": round((push_s - floor_s) / n * 1e6, 2),
              "push_us_per_tensor": round(push_s / n * 1e6, 2),
              "floor_us_per_tensor": round(floor_s / n * 1e6, 2)}
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(sync.push, tensors)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
