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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="share-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the benchmark suites and print ratios against same-run baselines")
    b.add_argument("suites", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--preset", choices=["full", "quick"], default="full", help="shapes: the issues' (full) or tiny (quick)")
    b.add_argument("--out", default="bench-out", help="directory for the CSV files (default: bench-out)")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
