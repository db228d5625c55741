"""The ``share-kernels`` command."""
from __future__ import annotations

import argparse
import sys

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bench(args) -> int:
    from .bench import SUITES, run_suites

    names = args.suites or list(SUITES)
    device = torch.device(args.device or _default_device())
    run_suites(names, device, args.preset, args.out)
    if args.out:
        print(f"\nCSV written under {args.out}/")
    return 0


def _compress(args) -> int:
    from .continual.compress import compress, parse_adapter_args

    try:
        report = compress(
            parse_adapter_args(args.adapters), args.k, args.out, p=args.p, base=args.base, plot=args.plot, max_k=args.max_k,
            progress=not args.quiet, device=args.device or _default_device(),
        )
    except (ValueError, TypeError, ImportError) as e:
        print(f"share-kernels compress: error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"\nShare adapters written to {args.out}/ (load: share_kernels.load_adapters(base_model, {args.out!r}))")
    if args.plot:
        print(f"error against k plotted to {args.plot}")
    return 0


def _continual(args) -> int:
    from .harness.run import main as run_harness

    return run_harness(args)


def _gpu_check(args) -> int:
    from .gpu_check import run

    return run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="share-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suites and print ratios against same-run baselines")
    b.add_argument("suites", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--preset", choices=["full", "quick"], default="full", help="shapes: the issues' (full) or tiny (quick)")
    b.add_argument("--out", default="bench-out", help="directory for the CSV files (default: bench-out)")
    b.set_defaults(func=_bench)
    c = sub.add_parser("compress", help="compress peft LoRA adapters into one Share subspace and report the error")
    c.add_argument(
        "adapters", nargs="+", metavar="ADAPTER_DIR",
        help="peft adapter directories (task = dir name), or NAME=DIR to name the task",
    )
    c.add_argument("--k", required=True, help="directions per layer (int), or an explained-energy threshold like 0.99")
    c.add_argument("--out", required=True, help="output directory (share_kernels.load_adapters reads it)")
    c.add_argument("--p", type=int, help="coefficient columns per task (default: the largest adapter rank, exact)")
    c.add_argument("--plot", metavar="PNG", help="write a PNG of the error against k (needs matplotlib)")
    c.add_argument("--base", metavar="MODEL", help="check layer names and shapes against this model's config")
    c.add_argument("--max-k", type=int, default=64, help="cap on k under an energy threshold (default 64)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--device", help="where the SVDs run: cpu or cuda (default: cuda when available, else cpu)")
    c.set_defaults(func=_compress)
    h = sub.add_parser("continual", help="learn a stream of real text tasks with every method; accuracy matrices, forgetting, storage")
    from .harness.run import add_arguments as _continual_arguments

    _continual_arguments(h)
    h.set_defaults(func=_continual)
    gc = sub.add_parser("gpu-check", help="first run on a GPU: compile, test every kernel, time the goal shapes, report (8 min)")
    from .gpu_check import add_arguments as _gpu_check_arguments

    _gpu_check_arguments(gc)
    gc.set_defaults(func=_gpu_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
