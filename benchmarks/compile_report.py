"""Compile every Triton kernel configuration the launchers can select, ahead of time for a CUDA
target (default sm_90), and print the compiler's resource report per configuration: registers,
spill stack, shared memory, and whether the dots became Hopper ``wgmma``. Needs no GPU (Triton's
bundled ptxas); compiles in parallel worker processes (see share_kernels/kernels/aot.py).

    python benchmarks/compile_report.py              # the fit table; exit 1 on any spill / smem
    python benchmarks/compile_report.py --jobs 2 --grep lowrank_linear
    python benchmarks/compile_report.py --plan gpu-check   # the set `share-kernels gpu-check` compiles

A configuration fits when it compiles with no spill stack and no local memory and uses at most
227 KB of shared memory per block (sm_90's limit). tests/test_sm90_fit.py runs this in CI.
"""
import argparse
import os
import sys
import tempfile
import time

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from share_kernels.kernels import aot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--grep", default="", help="only configurations whose name contains this")
    ap.add_argument("--max-smem", type=int, default=aot.SM90_MAX_SMEM)
    ap.add_argument("--plan", choices=["fit", "gpu-check"], default="fit",
                    help="fit: every selectable configuration (default); gpu-check: what `share-kernels gpu-check` "
                         "compiles on a GPU (its count and compile time on this CPU)")
    args = ap.parse_args(argv)
    if args.plan == "gpu-check":
        from share_kernels.gpu_check import compile_plan

        tasks = compile_plan(cuda=True)
    else:
        tasks = aot.fit_tasks()
    tasks = [t for t in tasks if args.grep in t.name()]
    t0 = time.perf_counter()
    # A fresh cache: every configuration is compiled here, none read from an earlier run.
    with tempfile.TemporaryDirectory() as cache:
        results = aot.compile_tasks(tasks, arch=args.arch, jobs=args.jobs, cache_dir=cache)
    wall = time.perf_counter() - t0
    print(aot.format_table(results))
    bad = [r for r in results if not aot.fits(r, args.max_smem)]
    serial = sum(r["seconds"] for r in results)
    print(f"{len(results)} configurations, {len(bad)} not fitting sm_{args.arch}; "
          f"compile {wall:.0f} s wall with {args.jobs} jobs ({serial:.0f} s summed)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
