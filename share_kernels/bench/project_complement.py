"""Benchmark of ``project_complement`` (remove mode) against ``X - M @ (M.T @ X)`` in PyTorch
(:func:`project_complement_reference`), and of ``project_complement_grouped`` against a Python
loop of the single op (and of the reference); every baseline is timed in the same run.

Single rows: d in {768, 4096}, n in {4096, 65536}, k in {16, 128, d/2}; fp32, and bf16 on
CUDA. ``flop/B`` is the work per byte of the minimum traffic (read X, write out): below the
device's flop/byte balance a shape is memory-bound, which is where the fused pass pays off.
``ext GB/s`` counts that minimum traffic; on CPU the output's fresh pages (the allocator
returns large blocks to the OS) are part of every call, in both. On CPU the shapes above
500 GFLOP per call (d = 4096, n = 65536, k = 2048: 2.2 TFLOP) are skipped, with a row saying so.

Grouped rows: 24 layers of d = 768 with n in {16 (a few vectors per layer), 768 (a d x d
matrix such as a covariance), 4096} and k in {16, 128}. One call saves the per-call overhead
(kernel launches on CUDA), so the gain is largest for small n.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops.project_complement import project_complement, project_complement_grouped, project_complement_reference
from . import model as perf
from .common import copy_bandwidth_gbs, rotating, time_ms

NAME = "project_complement"

FULL_D = (768, 4096)
FULL_N = (4096, 65536)
GROUP_LAYERS, GROUP_D = 24, 768
GROUP_N = (16, 768, 4096)
GROUP_K = (16, 128)
CPU_MAX_FLOP = 500e9


def shapes(device: torch.device, preset: str):
    """([(d, n, k)], dtypes, group cases [(layers, d, n, k)]) for a preset on a device."""
    if preset == "quick":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return [(128, 256, 8), (128, 1024, 64)], (dtype,), [(4, 64, 128, 8)]
    single = [(d, n, k) for d in FULL_D for n in FULL_N for k in (16, 128, d // 2)]
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    return single, dtypes, [(GROUP_LAYERS, GROUP_D, n, k) for n in GROUP_N for k in GROUP_K]


def _orthonormal(d: int, k: int, device, generator) -> torch.Tensor:
    a = torch.randn(d, k, generator=generator, device=device, dtype=torch.float32)
    return torch.linalg.qr(a)[0]


def _n_sets(nbytes: int, device) -> int:
    """Enough input sets that together they exceed 128 MB (well past any L2); two on CPU."""
    if device.type == "cpu":
        return 2
    return max(2, min(8, -(-(128 << 20) // nbytes)))


def make_case(d: int, n: int, k: int, dtype, device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rotating input sets (X (d, n), M (d, k) orthonormal) for one shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    count = _n_sets(d * n * torch.finfo(dtype).bits // 8, device)
    return [
        (torch.randn(d, n, generator=g, device=device).to(dtype), _orthonormal(d, k, device, g).to(dtype))
        for _ in range(count)
    ]


def make_group_case(layers: int, d: int, n: int, k: int, dtype, device, seed: int = 0):
    """Rotating input sets ([X_l], [M_l]) of ``layers`` layers of one shape."""
    g = torch.Generator(device=device).manual_seed(seed)
    count = _n_sets(layers * d * n * torch.finfo(dtype).bits // 8, device)
    sets = []
    for _ in range(count):
        Xs = [torch.randn(d, n, generator=g, device=device).to(dtype) for _ in range(layers)]
        Ms = [_orthonormal(d, k, device, g).to(dtype) for _ in range(layers)]
        sets.append((Xs, Ms))
    return sets


IMPLS = {
    "ext": lambda X, M: project_complement(X, M),
    "torch": lambda X, M: project_complement_reference(X, M),
}
GROUP_IMPLS = {
    "grouped": lambda Xs, Ms: project_complement_grouped(Xs, Ms),
    "loop": lambda Xs, Ms: [project_complement(X, M) for X, M in zip(Xs, Ms)],
    "loop torch": lambda Xs, Ms: [project_complement_reference(X, M) for X, M in zip(Xs, Ms)],
}


def case_fn(impl: str, sets) -> Callable[[], object]:
    """A no-argument callable running ``impl`` (a key of IMPLS or GROUP_IMPLS) on the next set."""
    return rotating({**IMPLS, **GROUP_IMPLS}[impl], sets)


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    single, dtypes, groups = shapes(device, preset)
    budget = 0.3 if preset == "quick" else 1.0
    min_reps = 3 if device.type == "cpu" else 5
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            elem = torch.finfo(dtype).bits // 8
            for d, n, k in single:
                flop = 4.0 * d * n * k
                row = {"case": f"d={d} n={n} k={k}", "dtype": str(dtype).replace("torch.", "")}
                row["flop/B"] = flop / (2 * d * n * elem)
                cost = perf.project_complement(d, n, k, elem)
                if device.type == "cpu" and flop > CPU_MAX_FLOP:
                    row.update(perf.columns(cost))  # the model alone
                    row["note"] = f"skipped on cpu: {flop / 1e12:.1f} TFLOP per call"
                    echo(f"  {row['case']}: {row['note']}")
                    rows.append(row)
                    continue
                sets = make_case(d, n, k, dtype, device)
                for impl in IMPLS:
                    row[f"{impl} ms"] = time_ms(case_fn(impl, sets), device, min_reps=min_reps, budget_s=budget)
                row["torch/ext"] = row["torch ms"] / row["ext ms"]
                row["ext GB/s"] = 2 * d * n * elem / (row["ext ms"] * 1e-3) / 1e9
                row["copy GB/s"] = copy_gbs
                row.update(perf.columns(cost, row["ext ms"], device))
                echo(f"  {row['case']} {row['dtype']}: torch/ext {row['torch/ext']:.2f}")
                rows.append(row)
                del sets
            for layers, d, n, k in groups:
                row = {"case": f"grouped {layers}x d={d} n={n} k={k}", "dtype": str(dtype).replace("torch.", "")}
                sets = make_group_case(layers, d, n, k, dtype, device)
                for impl in GROUP_IMPLS:
                    row[f"{impl} ms"] = time_ms(case_fn(impl, sets), device, min_reps=min_reps, budget_s=budget)
                row["loop/grouped"] = row["loop ms"] / row["grouped ms"]
                row["loop torch/grouped"] = row["loop torch ms"] / row["grouped ms"]
                row.update(perf.columns(perf.project_complement(d, n, k, elem).times(layers), row["grouped ms"], device))
                echo(f"  {row['case']} {row['dtype']}: loop/grouped {row['loop/grouped']:.2f}")
                rows.append(row)
                del sets
    return rows
