"""The ``loadfsm`` command: demo, load, trace, plan."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> int:
    from .demo import format_demo, run_demo
    figures = run_demo(args.model, quant=_quant(args.quant), device=args.device,
                       dummy=args.dummy, seed=args.seed, progress=not args.json)
    print(json.dumps(figures) if args.json else format_demo(figures))
    return 0


def _load(args) -> int:
    from .api import load
    from .testing import build_model
    model = build_model(args.model)
    report = load(model, args.path, quant=_quant(args.quant), device=args.device,
                  trace=args.trace, strict=not args.no_strict, progress=not args.json,
                  watchdog=args.watchdog)
    figures = report.to_dict()
    if args.json:
        print(json.dumps(figures))
    else:
        for key in ("states", "peak_bytes", "final_bytes", "largest_layer_bytes",
                    "cuda_peak_bytes", "seconds", "missing", "unexpected"):
            print(f"{key}: {figures[key]}")
    return 0


def _trace(args) -> int:
    from .trace_summary import format_summary, summarize, summary_dict
    summary = summarize(args.file, top=args.top)
    print(json.dumps(summary_dict(summary)) if args.json else format_summary(summary))
    if args.perfetto:
        from .trace_export import write_perfetto
        write_perfetto(args.file, args.perfetto)
        print(f"wrote {args.perfetto}: open it at https://ui.perfetto.dev", file=sys.stderr)
    if args.plot:
        from .trace_plot import write_plot
        write_plot(args.file, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if summary.ok else 1


def _plan(args) -> int:
    from .plan_cli import format_plan, plan_checkpoint
    plan = plan_checkpoint(args.path, model=args.model, hf=args.hf, quant=_quant(args.quant))
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan, top=args.top))
    return 0 if not (plan.missing or plan.unexpected) else 1


def _quant(name: str) -> str | None:
    return None if name in ("none", "bf16") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadfsm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load the built-in tiny model in FP8 and show figures")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument("--dummy", action="store_true", help="seeded random weights, no file")
    demo.add_argument("--model", default="tiny", help="reference model name (default tiny)")
    demo.add_argument("--quant", default="fp8", help="fp8, fp8-channel, fp8-block, int8 or none")
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    ld = sub.add_parser("load", help="load a checkpoint into a reference model")
    ld.add_argument("path")
    ld.add_argument("--model", required=True, help="reference model name, e.g. tiny")
    ld.add_argument("--quant", default="fp8")
    ld.add_argument("--device", default=None)
    ld.add_argument("--trace", default=None, help="write a JSONL trace to this file")
    ld.add_argument("--json", action="store_true")
    ld.add_argument("--no-strict", action="store_true", help="report missing/unexpected")
    ld.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                    help="warn when no tensor arrived for this long (off by default)")
    ld.set_defaults(func=_load)

    tr = sub.add_parser("trace", help="summarize a JSONL trace")
    tr.add_argument("file")
    tr.add_argument("--top", type=int, default=5, help="how many slowest layers to show")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--perfetto", metavar="OUT.json", default=None,
                    help="also write a Chrome/Perfetto trace-event file (ui.perfetto.dev)")
    tr.add_argument("--plot", metavar="OUT.png", default=None,
                    help="also draw memory and layer lifecycles (needs loadfsm[plot])")
    tr.set_defaults(func=_trace)

    pl = sub.add_parser("plan", help="dry run from the checkpoint's headers: no data read")
    pl.add_argument("path", help="safetensors file or directory")
    which = pl.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="reference model name, e.g. tiny")
    which.add_argument("--hf", action="store_true", help="a transformers checkpoint "
                       "directory (its config.json picks the model)")
    pl.add_argument("--quant", default="fp8")
    pl.add_argument("--top", type=int, default=10, help="how many layers the table shows")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
