"""Every Triton configuration the launchers can select fits sm_90, checked without a GPU.

``benchmarks/compile_report.py`` compiles (Triton's real compiler and bundled ptxas, a fresh
cache, worker processes in parallel) every configuration the autotuners' prunes keep, for every
kernel, direction (forward, the backward's dx with and without the stored t), dtype and rank
bucket, and reads registers, spill stack and shared memory from each cubin. One spill or more
than 227 KB of shared memory per block fails the test; the table is printed either way.
"""
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_every_selectable_configuration_fits_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "compile_report.py")],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    wall = time.perf_counter() - t0
    print(proc.stdout)
    print(f"sm_90 fit test: {wall:.0f} s wall")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("lowrank_", "multi_task_", "stability_loss"))]
    kernels = {ln.split()[0] for ln in rows}
    assert kernels == {"lowrank_linear", "lowrank_reduce", "lowrank_shrink", "multi_task_core", "multi_task_linear", "stability_loss"}, proc.stdout[-3000:]
    # Every direction, dtype and rank bucket is present, and every row fits.
    for tag in ("bfloat16 fwd", "float16 dx_t", "bfloat16 dx ", "k128", "grouped", "float32 grad"):
        assert any(tag in ln for ln in rows), tag
    assert all(ln.endswith(" ok") for ln in rows), "\n".join(ln for ln in rows if not ln.endswith(" ok"))
    # The prefill configurations use Hopper's wgmma (a guard against a silent fallback to mma).
    prefill = [ln for ln in rows if ln.startswith("lowrank_linear bfloat16 fwd k16 M4096")]
    assert prefill and all(int(ln.split()[-3]) > 0 for ln in prefill), prefill
