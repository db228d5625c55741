"""Benchmark suites behind ``share-kernels bench``.

A suite is a module with ``NAME`` and ``run(device, preset) -> list[dict]``: each dict is one
table row (a case, its timings, and its ratios against baselines timed in the same run).
``preset`` is ``"full"`` (the shapes the issues name), or ``"quick"`` (tiny shapes, a smoke
test). Add a suite by appending its module path to ``SUITES``.
"""
from __future__ import annotations

import csv
import importlib
import os
from typing import Iterable

import torch

from .common import environment, format_table

SUITES = {
    "inflora": "share_kernels.bench.inflora",
    "lowrank_linear": "share_kernels.bench.lowrank_linear",
    "multi_task_linear": "share_kernels.bench.multi_task_linear",
    "project_complement": "share_kernels.bench.project_complement",
    "pslora": "share_kernels.bench.pslora",
    "share": "share_kernels.bench.share",
    "vs_peft": "share_kernels.bench.vs_peft",
}


def run_suites(names: Iterable[str], device: torch.device, preset: str, out_dir: str | None, echo=print) -> dict:
    """Run the named suites, print each table, write ``<out_dir>/<suite>.csv``; return the rows."""
    env = environment(device)
    echo("  ".join(f"{k}: {v}" for k, v in env.items()) + f"  preset: {preset}")
    results = {}
    for name in names:
        if name not in SUITES:
            raise ValueError(f"unknown benchmark suite {name!r}; choose from {sorted(SUITES)}")
        suite = importlib.import_module(SUITES[name])
        echo(f"\n== {name} ==")
        rows = suite.run(device, preset, echo=echo)
        echo(format_table(rows))
        results[name] = rows
        if out_dir:
            write_csv(os.path.join(out_dir, f"{name}.csv"), rows, env)
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
