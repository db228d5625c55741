"""Benchmark suites behind ``share-kernels bench``.

A suite is a module with ``NAME`` and ``run(device, preset) -> list[dict]``: each dict is one
table row (a case, its timings, and its ratios against baselines timed in the same run).
``preset`` is ``"full"`` (the shapes the issues name), or ``"quick"`` (tiny shapes, a smoke
test). Add a suite by appending its module path to ``SUITES`` (and a line to ``SUITE_HELP``).

This module imports no torch at import time: the command's ``--help`` lists the suites from here.
"""
from __future__ import annotations

import csv
import importlib
import os
import textwrap
import time
from typing import Iterable

SUITES = {
    "inflora": "share_kernels.bench.inflora",
    "lowrank_linear": "share_kernels.bench.lowrank_linear",
    "multi_task_linear": "share_kernels.bench.multi_task_linear",
    "project_complement": "share_kernels.bench.project_complement",
    "pslora": "share_kernels.bench.pslora",
    "share": "share_kernels.bench.share",
    "vs_peft": "share_kernels.bench.vs_peft",
}

#: one line per suite for ``share-kernels bench --help``
SUITE_HELP = {
    "inflora": "InfLoRA task boundary (begin_task + end_task), grouped projection vs a per-layer loop",
    "lowrank_linear": "fused F.linear + low-rank path vs F.linear alone, the PyTorch reference and peft",
    "multi_task_linear": "one batch, many tasks (Share) vs single-task, peft adapter_names and a BGMV gather",
    "project_complement": "X - M (M^T X) (C++/CUDA extension) vs PyTorch; grouped vs a loop",
    "pslora": "stability loss fwd+bwd vs the naive formula; the PS-LoRA layer's merged-weight forward",
    "share": "bytes per task vs per-task LoRA; a Share training step vs peft LoRA",
    "vs_peft": "Share / InfLoRA / PS-LoRA vs peft LoRA on a MiniLM-sized BERT: train, infer, mixed batches",
}

#: what the columns of every table mean
LEGEND = (
    "Legend: 'X ms' = median time of one call of X; 'A/B' = time of A / time of B, measured in this run "
    "(> 1: B is faster, except 'GB/s' and 'bw' columns, which are bandwidths); 'GB/s' = bytes moved / "
    "time; 'copy GB/s' = a plain device copy, the memory roofline; 'B/tenant' = bytes stored per task; "
    "'n/a' = not measured (e.g. peft not installed); 'note' says what this device ran."
)


def run_suites(names: Iterable[str], device, preset: str, out_dir: str | None, echo=print) -> dict:
    """Run the named suites, print each table (with a counter and elapsed time), write
    ``<out_dir>/<suite>.csv``, then print the goals met or missed; returns the rows."""
    from .common import environment, format_table
    from .goals import format_verdicts, verdicts

    names = list(names)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; choose from {sorted(SUITES)}")
    env = environment(device)
    echo(textwrap.fill("  ".join(f"{k}: {v}" for k, v in env.items()) + f"  preset: {preset}", 120))
    echo(textwrap.fill(LEGEND, 120))
    results = {}
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        suite = importlib.import_module(SUITES[name])
        t_suite = time.perf_counter()
        echo(f"\n== [{i}/{len(names)}] {name}: {SUITE_HELP.get(name, '')} ==")
        rows = suite.run(device, preset, echo=echo)
        echo(format_table(rows))
        took, total = time.perf_counter() - t_suite, time.perf_counter() - t0
        echo(f"-- {name} done in {took:.1f} s ({total:.0f} s elapsed, {i}/{len(names)} suites)")
        results[name] = rows
        if out_dir:
            write_csv(os.path.join(out_dir, f"{name}.csv"), rows, env)
    echo("\n" + format_verdicts(verdicts(results, device.type)))
    return results


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    """Atomic write (temp file, then rename) with the environment repeated on every row."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cols += list(env)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    os.replace(tmp, path)
