"""Host cost per layer of a push (and of a load): Python microseconds and torch ops.

    python benchmarks/push_overhead.py [--layers 32] [--quant fp8] [--base /tmp/base]
                                       [--device cuda] [--json]
    git archive <commit> loadfsm | tar -x -C /tmp/base     # a tree to compare against

On an H200 an in-process push of Llama-8B shapes is bound by the host: every torch op
is a 5-10 us launch, and every layer runs the driver's, the handler's and the writer's
Python. This proxy makes that cost the whole cost: a Llama with many layers of tiny
shapes (hidden 64), on the CPU, so a kernel's arithmetic is nothing next to its dispatch.
Per layer touched (a linear, a norm, the embedding) it reports:
  us          wall time of ``WeightSync.push`` (median of ``--pushes``) per layer
  torch_us    of which inside torch calls (timed at each call from Python, by a profile
              hook whose own cost lands here too: an upper bound)
  python_us   the rest: loadfsm's own Python (and the interpreter's)
  ops         aten ops dispatched (``TorchDispatchMode``): on CUDA each that is not a
              view is a kernel launch or an allocation; deterministic, not a timing
  calls       Python function calls (deterministic)
  ops_by      ops by where loadfsm issued them: arrive (driver, landing, a handler's
              staging), finite (finiteness), quantize (quant, handlers), commit (writer),
              other (planning, buffers, the model's own code)
``load`` rows are the same for ``loadfsm.load`` of the same tensors from an iterator.
On the CPU, FP8 quantizes on the torch reference (several ops per weight); with
``--device cuda`` on the fused Triton kernels (two launches per weight, their Python in
``python_us``), and every op is a real launch: the same proxy where it costs most.
``--base`` runs the same worker on another source tree in its own process, alternating
with this one (``compare_trees.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = (("loading/finiteness", "finite"), ("loading/driver", "arrive"),
          ("loading/landing", "arrive"), ("loading/writer", "commit"), ("quant/", "quantize"),
          ("handlers/", "quantize"))
WHAT = ("push", "load")
_STAGING = ("materialize", "defaults")      # a handler's staging, made as pieces arrive


def _testing():
    try:
        import loadfsm.testing as testing
    except ImportError:                    # trees before 2026-11-29
        import loadfsm.models as testing
    return testing


def _config(layers: int):
    from dataclasses import replace
    testing = _testing()
    return replace(testing.CONFIGS["tiny"], vocab_size=256, hidden_size=64,
                   intermediate_size=128, num_layers=layers, num_heads=4, num_kv_heads=2,
                   head_dim=16, max_seq_len=16)


def _phase(frame) -> str:
    """Where the innermost loadfsm frame above a torch op lives."""
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/loadfsm/" in path:
            if frame.f_code.co_name in _STAGING:
                return "arrive"
            for part, phase in PHASES:
                if part in path:
                    return phase
            return "other"
        frame = frame.f_back
    return "other"


def _count_ops(run) -> collections.Counter:
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[_phase(sys._getframe(1))] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        run()
    return ops


def _count_calls(run) -> int:
    calls = 0

    def hook(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def _torch_seconds(run) -> float:
    """Seconds spent inside torch's C functions called from Python during ``run``."""
    import torch

    spent, started = 0.0, []
    clock = time.perf_counter

    def hook(frame, event, arg):
        nonlocal spent
        if event == "c_call":
            module = getattr(arg, "__module__", None) or ""
            started.append(clock() if module.startswith("torch")
                           or isinstance(getattr(arg, "__self__", None), torch.Tensor)
                           else None)
        elif event in ("c_return", "c_exception") and started:
            t0 = started.pop()
            if t0 is not None:
                spent += clock() - t0

    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
    return spent


def worker(what: str, layers: int, quant: str, pushes: int, device: str = "cpu") -> dict:
    """Figures of one workload in this process (the tree on ``sys.path``)."""
    import torch

    def settled():                 # on a GPU: what the host queued has run
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    import loadfsm
    testing = _testing()
    torch.manual_seed(0)
    config = _config(layers)
    tensors = [(n, t.to(device)) for n, t in testing.reference_state_dict(config, 1).items()]
    if what == "push":
        model = testing.build_model(config)
        loadfsm.load(model, list(testing.reference_state_dict(config, 0).items()),
                     quant=quant, device=device)
        sync = loadfsm.WeightSync(model)
        touched = len({sync._routes.resolve(name, t.shape).rec.name for name, t in tensors})

        def prepare():
            return sync

        def run(sync):
            sync.push(tensors)
    else:
        touched = len(loadfsm.LoadSession(testing.build_model(config), quant=quant,
                                          device=device).plan.layers)

        def prepare():                  # a fresh model on ``meta``, built outside the count
            return testing.build_model(config)

        def run(model):
            loadfsm.load(model, tensors, quant=quant, device=device)

    def measured(measure):
        target = prepare()
        return measure(lambda: run(target))

    for _ in range(3):
        measured(lambda go: go())
    times = []
    for _ in range(pushes):
        target = prepare()
        settled()
        t0 = time.perf_counter_ns()
        run(target)
        settled()
        times.append(time.perf_counter_ns() - t0)
    torch_us = statistics.median(measured(_torch_seconds) for _ in range(3)) * 1e6 / touched
    ops = measured(_count_ops)
    calls = measured(_count_calls)
    wall = statistics.median(times) / 1e3 / touched
    return {"layers": touched, "us": wall, "torch_us": min(torch_us, wall),
            "python_us": max(wall - torch_us, 0.0),
            "ops": sum(ops.values()) / touched,
            "calls": calls / touched,
            "ops_by": {k: v / touched for k, v in sorted(ops.items())}}


def _run(tree: Path, what: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", what,
                          str(args.layers), args.quant, str(args.pushes), args.device],
                         env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise RuntimeError(f"{tree} {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the model")
    parser.add_argument("--quant", default="fp8")
    parser.add_argument("--pushes", type=int, default=30, help="timed runs per round")
    parser.add_argument("--device", default="cpu", help="cuda: the launches themselves")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", type=Path, help="a loadfsm source tree to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trees = {"new": Path(__file__).resolve().parent.parent}
    if args.base is not None:
        trees = {"base": args.base, **trees}
    results: dict = {}
    for what in WHAT:
        rounds = {label: [] for label in trees}
        for _ in range(args.rounds):
            for label, tree in trees.items():
                rounds[label].append(_run(tree, what, args))
        for label, runs in rounds.items():
            best = dict(runs[0])
            for key in ("us", "torch_us", "python_us"):
                best[key] = statistics.median(r[key] for r in runs)
            results[f"{what} {label}"] = best
    if args.json:
        print(json.dumps(results, indent=2))
        return results
    print(f"{'per layer':12} {'us':>8} {'torch_us':>9} {'python_us':>10} {'ops':>7} "
          f"{'calls':>7}   ops by phase")
    for row, r in results.items():
        by = " ".join(f"{k}={v:.1f}" for k, v in r["ops_by"].items())
        print(f"{row:12} {r['us']:8.1f} {r['torch_us']:9.1f} {r['python_us']:10.1f} "
              f"{r['ops']:7.1f} {r['calls']:7.1f}   {by}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
                                sys.argv[6])))
    else:
        main()
