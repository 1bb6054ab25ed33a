"""One side of ``first_load.py``, in a fresh process; prints one JSON line last.

    python benchmarks/first_load_child.py SIDE --dir CKPT [--device cuda] [--quant fp8]
        [--spawned-at UNIX_TIME] [--warm] [--profile [--profile-out FILE]]

Sides:
  floor         import torch, CUDA init, import transformers' model machinery
                (``PreTrainedModel``): the fixed cost every first load pays
  loadfsm       ``loadfsm.hf.from_pretrained(quant=...)``; with ``--warm`` a second load in
                the same process after it (the warm anchor)
  transformers  ``AutoModelForCausalLM.from_pretrained`` with ``FineGrainedFP8Config`` (per
                tensor for ``fp8``, 128x128 blocks for ``fp8-block``, ``lm_head`` kept bf16
                as loadfsm keeps it); where transformers refuses (no GPU, no accelerate),
                the line says ``unavailable`` and why
Only the standard library is imported before a side starts: its imports are measured.
``--profile`` runs the loadfsm side's imports and first load under cProfile (main thread
only: reader threads show as waits) and prints the top 25 cumulative entries first.
"""

from __future__ import annotations

import time

STARTED = time.time()   # the script's first statement: "from process start" counts from here

# Imported after STARTED on purpose: everything from here on is inside the count.
import argparse
import gc
import json
from contextlib import contextmanager

HF_BLOCK = {"fp8": None, "fp8-block": (128, 128)}   # transformers' weight_block_size per scheme


@contextmanager
def _phase(phases: dict, name: str):
    t0 = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t0


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _model_bytes(model) -> int:
    """Bytes of every parameter and buffer, a tied tensor once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _fp8_tensors(model, torch) -> int:
    return sum(t.dtype == torch.float8_e4m3fn for t in [*model.parameters(), *model.buffers()])


def _measure(torch, device: str, spawned_at: float, load) -> tuple[object, dict]:
    """Run ``load()`` (returns the model) and measure it: the call's seconds (device
    synchronized), seconds from the script's start and from the parent's spawn to loaded,
    peak device bytes above the level before the call (CUDA only), the model's bytes."""
    cuda = device.startswith("cuda") and torch.cuda.is_initialized()
    if cuda:   # a second load: the first load's memory is gone, its peak forgotten
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    t0 = time.perf_counter()
    model = load()
    _sync(torch, device)
    seconds, now = time.perf_counter() - t0, time.time()
    peak = torch.cuda.max_memory_allocated(device) - base if device.startswith("cuda") else None
    return model, {"load_s": seconds, "since_start_s": now - STARTED,
                   "since_spawn_s": now - spawned_at, "peak_bytes": peak,
                   "model_bytes": _model_bytes(model), "fp8_tensors": _fp8_tensors(model, torch)}


def floor(args) -> dict:
    phases = {}
    with _phase(phases, "import_torch_s"):
        import torch
    with _phase(phases, "device_init_s"):
        torch.zeros(1, device=args.device)
        _sync(torch, args.device)
    with _phase(phases, "import_transformers_s"):
        # PreTrainedModel: the model machinery both loaders use (the lazy top-level
        # module alone imports little of it).
        from transformers import AutoModelForCausalLM, PreTrainedModel  # noqa: F401
    now = time.time()
    return {"phases": phases, "since_start_s": now - STARTED,
            "since_spawn_s": now - args.spawned_at}


def loadfsm_side(args) -> dict:
    phases = {}
    with _phase(phases, "import_torch_s"):
        import torch
    with _phase(phases, "import_loadfsm_s"):
        import loadfsm.hf
        load = loadfsm.hf.from_pretrained   # imports the integration, and transformers

    def once():
        return load(args.dir, quant=args.quant, device=args.device, dtype=torch.bfloat16).model

    model, first = _measure(torch, args.device, args.spawned_at, once)
    result = {"phases": phases, "first": first}
    if args.warm:
        del model
        gc.collect()
        _, result["warm"] = _measure(torch, args.device, args.spawned_at, once)
    return result


def transformers_side(args) -> dict:
    phases = {}
    with _phase(phases, "import_torch_s"):
        import torch
    try:   # any failure (no GPU, no accelerate, an older release): say why, measure nothing
        with _phase(phases, "import_transformers_s"):
            # As much as the loadfsm side imports before its call (see ``floor``).
            from transformers import AutoModelForCausalLM, FineGrainedFP8Config
            from transformers import PreTrainedModel  # noqa: F401
        config = FineGrainedFP8Config(weight_block_size=HF_BLOCK[args.quant],
                                      modules_to_not_convert=["lm_head"])
        _, first = _measure(torch, args.device, args.spawned_at, lambda: (
            AutoModelForCausalLM.from_pretrained(args.dir, quantization_config=config,
                                                 device_map=args.device, dtype=torch.bfloat16)))
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return {"unavailable": f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"}
    return {"phases": phases, "first": first,
            "hf_weight_block_size": config.weight_block_size}


SIDES = {"floor": floor, "loadfsm": loadfsm_side, "transformers": transformers_side}


def _profiled(args) -> dict:
    import cProfile
    import io
    import pstats
    profile = cProfile.Profile()
    result = profile.runcall(loadfsm_side, args)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
    print(out.getvalue())
    if args.profile_out:
        profile.dump_stats(args.profile_out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/first_load_child.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=sorted(SIDES))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quant", default="fp8", choices=sorted(HF_BLOCK))
    parser.add_argument("--spawned-at", type=float, default=STARTED,
                        help="the parent's time.time() when it started this process")
    parser.add_argument("--warm", action="store_true", help="loadfsm: a second load after")
    parser.add_argument("--profile", action="store_true", help="loadfsm: under cProfile")
    parser.add_argument("--profile-out", default=None, help="with --profile: dump the stats")
    args = parser.parse_args(argv)
    if args.profile and args.side != "loadfsm":
        parser.error("--profile profiles the loadfsm side only")
    result = _profiled(args) if args.profile else SIDES[args.side](args)
    print(json.dumps({"side": args.side, "device": args.device, "quant": args.quant,
                      **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
