"""GPU report: run every suite of ``share-kernels bench`` on the full preset and write the CSVs
and a markdown summary under ``benchmarks/results/<date>-<device>/``.

    python benchmarks/report.py                 # all suites, on cuda
    python benchmarks/report.py lowrank_linear  # one suite

Only numbers this run printed go into the folder; commit it with the device and date it names.

All six suites at the full preset take longer than a short GPU session: run
``share-kernels gpu-check --out DIR`` first (8-minute budget: compiles, checks every kernel,
times the goal shapes), and this script when there is time for the whole sweep.
"""
import argparse
import os
import re
import sys

import torch

from share_kernels.bench import SUITES, run_suites
from share_kernels.bench.common import environment, format_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="full", choices=["full", "quick"])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: benchmarks/results/ holds GPU results only", file=sys.stderr)
        return 2
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    out = os.path.join(args.root, f"{env['date']}-{slug}")
    results = run_suites(args.suites or list(SUITES), device, args.preset, out)
    lines = [f"# Benchmark results: {env['device']}, {env['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [f"- preset: {args.preset}", "",
              "Every ratio is against a baseline timed in the same run (see the suite docstrings).", ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", "```", format_table(rows), "```", ""]
    tmp = os.path.join(out, "README.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, "README.md"))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
