"""First load in a fresh process: loadfsm against transformers' own FP8 load, side by side.

    python benchmarks/first_load.py --dir CKPT --write-only [--layers 32]   # once; cached
    python benchmarks/first_load.py --dir CKPT [--repeat 3] [--json]
    python benchmarks/first_load.py --dir CKPT --profile                    # where it goes
    python benchmarks/first_load.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 2 --vocab 1024 --repeat 1                      # a CPU check

What a user meets is the first load: Python starts, imports torch and transformers, makes
a CUDA context, compiles kernels, allocates pinned buffers, and only then reads. Every
measured load runs in a process of its own (``first_load_child.py``); each round runs the
sides in turn, the order reversed every other round, so drift hits all alike:
  floor         Python + import torch + CUDA init + import transformers: the fixed cost
  loadfsm       loadfsm.hf.from_pretrained(quant=...), then a second (warm) load in the
                same process: the warm anchor
  transformers  AutoModelForCausalLM.from_pretrained(quantization_config=
                FineGrainedFP8Config(...), device_map=device, dtype=bfloat16), same scheme
Per load: the call's seconds, seconds from spawn to loaded, peak
``torch.cuda.max_memory_allocated``, the model's bytes and FP8 tensors. Medians over the
rounds (peaks: the largest). The checkpoint has Llama-3-8B shapes (``hf_checkpoint.py``);
its page cache is warmed first. Triton's on-disk kernel cache: ``--jit-cache warm``
(default) keeps the user's and runs one unmeasured round first; ``cold`` gives every
process an empty one, as in a fresh container.
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
from importlib import metadata
from pathlib import Path

from hf_checkpoint import cached, llama_8b_config, write_hf_checkpoint

CHILD = Path(__file__).resolve().with_name("first_load_child.py")
SIDES = ("floor", "loadfsm", "transformers")
_META_KEYS = ("side", "device", "quant")


class ChildFailed(RuntimeError):
    """A measured process exited badly or printed no result line."""


def parse_result(side: str, stdout: str) -> dict:
    """The last JSON line of ``side``'s output (libraries may print before it).

    Raises:
        ChildFailed: no line is a JSON object of that side.
    """
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(result, dict) and result.get("side") == side:
                return result
    raise ChildFailed(f"{side}: no result line in its output:\n{stdout[-2000:]}")


def spawn(side: str, directory: Path, args, *, env: dict | None = None,
          extra: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Run one side in a fresh process; its result and its whole standard output."""
    command = [sys.executable, str(CHILD), side, "--dir", str(directory),
               "--device", args.device, "--quant", args.quant, *extra]
    spawned_at = time.time()
    try:
        proc = subprocess.run([*command, "--spawned-at", repr(spawned_at)], env=env,
                              capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"{side}: no result within {args.child_timeout} s") from exc
    if proc.returncode:
        raise ChildFailed(f"{side}: exit status {proc.returncode}:\n{proc.stderr[-4000:]}")
    return parse_result(side, proc.stdout), proc.stdout


def _combine(samples: list[dict]) -> dict:
    """One figure per field over rounds: median of seconds, largest peak, else the first."""
    out = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, dict):
            out[key] = _combine(values)
        elif key.endswith("_s"):
            out[key] = statistics.median(values)
        elif key == "peak_bytes":
            out[key] = None if None in values else max(values)
        else:
            out[key] = first
    return out


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _at(result: dict, *keys):
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def _beyond_floor(result: dict, side: str) -> float | None:
    """Seconds of ``side``'s first load past the fixed cost every first load pays."""
    loaded, floor = _at(result, side, "first", "since_spawn_s"), _at(result, "floor", "since_spawn_s")
    return None if loaded is None or floor is None else loaded - floor


def summarize(rounds: list[dict[str, dict]]) -> dict:
    """Each side's figures over ``rounds`` (side -> child result) and the ratios.

    A side unavailable in any round is unavailable, with its first reason; ratios that
    need it are ``None``.
    """
    result = {}
    for side in rounds[0]:
        samples = [{k: v for k, v in r[side].items() if k not in _META_KEYS} for r in rounds]
        reasons = [s["unavailable"] for s in samples if "unavailable" in s]
        result[side] = {"unavailable": reasons[0]} if reasons else _combine(samples)
    floor, ours, theirs = (result.get(side, {}) for side in SIDES)
    beyond = {side: _beyond_floor(result, side) for side in ("loadfsm", "transformers")}
    for side, seconds in beyond.items():
        if seconds is not None:
            result[side]["first"]["beyond_floor_s"] = seconds
    result["ratios"] = {
        "transformers_over_loadfsm_load":
            _ratio(_at(theirs, "first", "load_s"), _at(ours, "first", "load_s")),
        "transformers_over_loadfsm_since_spawn":
            _ratio(_at(theirs, "first", "since_spawn_s"), _at(ours, "first", "since_spawn_s")),
        "transformers_over_loadfsm_beyond_floor":
            _ratio(beyond["transformers"], beyond["loadfsm"]),
        "loadfsm_first_over_warm_load":
            _ratio(_at(ours, "first", "load_s"), _at(ours, "warm", "load_s")),
        "floor_over_loadfsm_since_spawn":
            _ratio(_at(floor, "since_spawn_s"), _at(ours, "first", "since_spawn_s")),
        "loadfsm_peak_over_transformers_peak":
            _ratio(_at(ours, "first", "peak_bytes"), _at(theirs, "first", "peak_bytes")),
    }
    return result


_GOALS = {"transformers_over_loadfsm_load": ">= 3", "loadfsm_first_over_warm_load": "<= 1.3",
          "loadfsm_peak_over_transformers_peak": "<= 1"}


def format_result(r: dict) -> str:
    gb = lambda n: "n/a" if n is None else f"{n / 1e9:.3f} GB"  # noqa: E731
    s = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"{r['model']} on {r['device']}, quant={r['quant']}, checkpoint "
             f"{gb(r['checkpoint_bytes'])} in {r['shards']} shards, jit cache {r['jit_cache']}, "
             f"median of {r['repeat']} (torch {r['versions']['torch']}, "
             f"transformers {r['versions']['transformers']})",
             "| load | call s | spawn->loaded s | beyond floor s | peak | model | fp8 tensors |",
             "|---|---|---|---|---|---|---|"]
    floor = r["floor"]
    lines.append(f"| floor (python, torch, device init, transformers) | | "
                 f"{s(floor['since_spawn_s'])} | | | | |")
    rows = [("loadfsm first", r["loadfsm"].get("first")), ("loadfsm warm", r["loadfsm"].get("warm")),
            ("transformers first", r["transformers"].get("first"))]
    for label, m in rows:
        if m is None:
            continue
        lines.append(f"| {label} | {s(m['load_s'])} | "
                     f"{s(m['since_spawn_s']) if label.endswith('first') else ''} | "
                     f"{s(m.get('beyond_floor_s'))} | {gb(m['peak_bytes'])} | "
                     f"{gb(m['model_bytes'])} | {m['fp8_tensors']} |")
    if "unavailable" in r["transformers"]:
        lines.append(f"transformers: unavailable: {r['transformers']['unavailable']}")
    lines.append("phases (s): " + "; ".join(
        f"{side} " + ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in phases.items())
        for side in SIDES if (phases := _at(r, side, "phases"))))
    lines += [f"{k}: {s(v)}" + (f"  (goal {_GOALS[k]})" if k in _GOALS else "")
              for k, v in r["ratios"].items()]
    return "\n".join(lines)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _warm_page_cache(files: list[Path]) -> int:
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def _brief(result: dict) -> str:
    if "unavailable" in result:
        return "unavailable"
    if "first" in result:
        return f"load {result['first']['load_s']:.3f} s"
    return f"ready {result['since_spawn_s']:.3f} s after spawn"


def run_rounds(directory: Path, args, scratch: Path) -> list[dict[str, dict]]:
    """``args.repeat`` measured rounds (after one unmeasured round with a warm JIT cache)."""
    count = 0

    def env() -> dict | None:
        nonlocal count
        if args.jit_cache == "warm":
            return None
        count += 1   # an empty Triton cache for this process alone
        return {**os.environ, "TRITON_CACHE_DIR": str(scratch / f"triton-{count}")}

    rounds = []
    first = 0 if args.jit_cache == "cold" else -1
    for r in range(first, args.repeat):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        results = {}
        for side in order:
            extra = ("--warm",) if side == "loadfsm" else ()
            results[side], _ = spawn(side, directory, args, env=env(), extra=extra)
            label = f"round {r + 1}/{args.repeat}" if r >= 0 else "warm-up round"
            print(f"{label} {side}: {_brief(results[side])}",
                  file=sys.stderr, flush=True)
        if r >= 0:
            rounds.append({side: results[side] for side in SIDES})
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/first_load.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="checkpoint dir (written if absent or "
                        "empty, reused if it holds these shapes); a temporary one if omitted")
    parser.add_argument("--write-only", action="store_true", help="write --dir and exit")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quant", default="fp8", choices=("fp8", "fp8-block"))
    parser.add_argument("--layers", type=int, default=32)
    for name in ("hidden", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help="default: Llama-3-8B's")
    parser.add_argument("--shard-gb", type=float, default=5.0,
                        help="shard size when writing (Llama-3-8B ships ~5 GB shards)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jit-cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--child-timeout", type=float, default=300.0)
    parser.add_argument("--profile", action="store_true",
                        help="only loadfsm's first load, under cProfile: top 25 cumulative")
    parser.add_argument("--profile-out", default=None, help="with --profile: dump the stats")
    parser.add_argument("--json", action="store_true", help="end with the result as one line")
    args = parser.parse_args(argv)
    if args.write_only and not args.dir:
        parser.error("--write-only needs --dir")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    config = llama_8b_config(layers=args.layers, hidden=args.hidden,
                             intermediate=args.intermediate, heads=args.heads,
                             kv_heads=args.kv_heads, vocab=args.vocab)
    with tempfile.TemporaryDirectory(prefix="loadfsm-first-load-") as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "checkpoint"
        if not cached(config, directory):
            t0 = time.perf_counter()
            write_hf_checkpoint(config, directory, max_shard_bytes=int(args.shard_gb * 2**30))
            print(f"wrote {directory} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.write_only:
            return 0
        files = sorted(directory.glob("*.safetensors"))
        meta = {"model": f"Llama-8B shapes, {config.num_layers} layers "
                         f"(hidden {config.hidden_size}, vocab {config.vocab_size})",
                "layers": config.num_layers, "device": args.device, "quant": args.quant,
                "checkpoint_bytes": _warm_page_cache(files), "shards": len(files),
                "jit_cache": args.jit_cache,
                "versions": {n: _version(n) for n in ("torch", "transformers", "triton")}}
        if args.profile:
            extra = ("--profile",) + (("--profile-out", args.profile_out)
                                      if args.profile_out else ())
            result, stdout = spawn("loadfsm", directory, args, extra=extra)
            print("\n".join(line for line in stdout.splitlines() if not line.startswith("{")))
            result = {**meta, "profiled": True, "loadfsm": result}
            print(json.dumps(result) if args.json else json.dumps(result, indent=2))
            return 0
        result = {**meta, "repeat": args.repeat,
                  **summarize(run_rounds(directory, args, Path(tmp)))}
    print(format_result(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
