"""Two source trees of loadfsm side by side, in the same run: is a change a regression?

    git archive <commit> loadfsm | tar -x -C /tmp/base      # the tree to compare against
    python benchmarks/compare_trees.py /tmp/base . [--rounds 5] [--json]

Each workload runs in a fresh subprocess per tree, the trees alternating round by round
(so both see the same machine weather); the median of each and the ratio new/base are
printed. CPU only, through the public API (``loadfsm.load``, ``loadfsm.WeightSync``), so
it runs on any tree with that API:
  load      FP8 load of a 330 MB bf16 checkpoint (8 layers, hidden 1024) from safetensors
  push      WeightSync(model).push of new bf16 weights into that loaded model
  arrivals  FP8 load of a 2-layer MoE with 256 experts from an iterator, one expert
            tensor per arrival (bookkeeping-bound): seconds per arrival
  planning  LoadSession over 20,000 one-norm layers (planning is O(layers))
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = ("load", "push", "arrivals", "planning")
LOAD_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                   num_heads=16, num_kv_heads=8, head_dim=64)
MOE_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, num_experts=256,
                  experts_per_token=2, moe_intermediate_size=32)


def _testing():
    """The reference models of the tree under test (``loadfsm.models`` before 2026-11-29)."""
    try:
        import loadfsm.testing as testing
    except ImportError:
        import loadfsm.models as testing
    return testing


def _config(testing, fields: dict):
    from dataclasses import replace
    return replace(testing.CONFIGS["tiny"], **fields)


def worker(workload: str, checkpoint: str) -> float:
    """Seconds of one workload in this process (best of 2 after a warm-up)."""
    import torch
    from torch import nn

    import loadfsm
    testing = _testing()
    torch.manual_seed(0)

    def once() -> float:
        if workload in ("load", "push"):
            model = testing.build_model(_config(testing, LOAD_CONFIG))
            start = time.perf_counter()
            loadfsm.load(model, checkpoint, quant="fp8", device="cpu")
            if workload == "load":
                return time.perf_counter() - start
            new = testing.reference_state_dict(_config(testing, LOAD_CONFIG), 1)
            sync = loadfsm.WeightSync(model)
            start = time.perf_counter()
            sync.push(new.items())
            return time.perf_counter() - start
        if workload == "arrivals":
            config = _config(testing, MOE_CONFIG)
            items = list(testing.reference_state_dict(config).items())
            model = testing.build_model(config)
            start = time.perf_counter()
            loadfsm.load(model, items, quant="fp8", device="cpu")
            return (time.perf_counter() - start) / len(items)
        with torch.device("meta"):
            model = nn.Sequential(*(nn.LayerNorm(4) for _ in range(20_000)))
        start = time.perf_counter()
        loadfsm.LoadSession(model, device="cpu")
        return time.perf_counter() - start

    once()
    return min(once() for _ in range(2))


def _run(tree: Path, workload: str, checkpoint: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", workload, str(checkpoint)],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise RuntimeError(f"{tree} {workload} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.new.resolve()))
    testing = _testing()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        testing.write_checkpoint(_config(testing, LOAD_CONFIG), checkpoint)
        for workload in WORKLOADS:
            times = {"base": [], "new": []}
            for _ in range(args.rounds):
                for label in ("base", "new"):
                    times[label].append(_run(getattr(args, label), workload, checkpoint))
            base, new = statistics.median(times["base"]), statistics.median(times["new"])
            results[workload] = {"base_s": base, "new_s": new, "new_over_base": new / base}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for workload, r in results.items():
            print(f"{workload:9} base {r['base_s'] * 1e3:10.3f} ms   new {r['new_s'] * 1e3:10.3f} ms"
                  f"   new/base {r['new_over_base']:.3f}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(worker(sys.argv[2], sys.argv[3]))
    else:
        main()
