"""Benchmark of PS-LoRA's pieces.

1. ``stability_loss`` forward + backward (grads of A and B) at r = 16: the op (Triton tile
   kernel on CUDA, the extension's C++ kernel on CPU) against the naive PyTorch a user writes
   (dense D, autograd), time and peak memory, in the same run.
2. ``PSLoRALinear``'s forward: the merged weight copy ``W + prev_delta`` it keeps, against
   forming ``W + prev_delta`` on every call (the alternative design), at a decode-sized and a
   training-sized batch.

Peak memory: on CUDA the allocator's peak above what was live before the call; on CPU the
process's resident high-water mark above the start (:func:`cpu_peak_bytes`, Linux; a few MB
of resolution, so only the full preset's sizes say much).
"""
from __future__ import annotations

import torch

from ..ops.lowrank_linear import lowrank_linear
from ..ops.stability_loss import _cpu_kernel_loaded, stability_loss
from . import model as perf
from .common import peak_memory_bytes, rotating, time_ms

NAME = "pslora"
RANK = 16
ALPHA = 100.0


def naive_stability_loss(A, B, P, alpha):
    """What a user writes in plain PyTorch: D = B A materialised, autograd keeps its temporaries."""
    D = B @ A
    return ((1 - torch.tanh(alpha * D) * torch.tanh(alpha * P)) * D**2).sum()


def _rss_field(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def cpu_peak_bytes(fn) -> int | None:
    """Peak resident memory above the start during one call of ``fn`` (Linux): freed heap memory
    is returned to the OS first (``malloc_trim``), the kernel's high-water mark is reset
    (``/proc/self/clear_refs``), then ``VmHWM - VmRSS`` after the call. Resolution: a few MB
    (pages the call touches for the first time count too). None where this is not available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_field("VmRSS:")
    except OSError:
        return None
    fn()
    return max(_rss_field("VmHWM:") - base, 0)


def peak_mb(fn, device: torch.device) -> float:
    b = peak_memory_bytes(fn, device) if device.type == "cuda" else cpu_peak_bytes(fn)
    return float("nan") if b is None else b / 1e6


def make_inputs(d: int, r: int, dtype, device, seed: int = 0):
    """A (r, d), B (d, r), P (d, d) at LoRA-like scales: entries of B A and P ~ 1/alpha."""
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s, scale: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    A = rnd(r, d, scale=d**-0.5)
    B = rnd(d, r, scale=(d / r) ** 0.5 / ALPHA)
    return A.requires_grad_(), B.requires_grad_(), rnd(d, d, scale=1.0 / ALPHA)


def _loss_step(f):
    def step(A, B, P):
        return torch.autograd.grad(f(A, B, P, ALPHA), [A, B])

    return step


def _n_sets(d, dtype, device) -> int:
    if device.type == "cpu":
        return 2
    per_set = d * d * torch.finfo(dtype).bits // 8
    return max(2, min(8, -(-(128 << 20) // per_set)))


def loss_rows(device, ds, dtypes, budget, echo) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for d in ds:
            sets = [make_inputs(d, RANK, dtype, device, seed=i) for i in range(_n_sets(d, dtype, device))]
            row = {"case": f"loss fwd+bwd d={d} r={RANK}", "dtype": str(dtype).replace("torch.", "")}
            for impl, f in (("fused", stability_loss), ("naive", naive_stability_loss)):
                step = _loss_step(f)
                row[f"{impl} ms"] = time_ms(rotating(step, sets), device, budget_s=budget)
                step(*sets[0])  # first call outside the measurement (lazy init, autotune)
                row[f"{impl} peak MB"] = peak_mb(lambda: step(*sets[0]), device)
            row["naive/fused time"] = row["naive ms"] / row["fused ms"]
            row["naive/fused mem"] = row["naive peak MB"] / max(row["fused peak MB"], 1e-9)
            cost = perf.stability_loss_train(d, d, RANK, perf.elt_size(dtype))
            row.update(perf.columns(cost, row["fused ms"], device))
            cpu_note = (
                "fused = C++ kernel (csrc/stability_loss.cpp)"
                if dtype != torch.float64 and _cpu_kernel_loaded()
                else "fused = chunked reference (CPU path)"
            )
            row["note"] = "fused = Triton tile kernel" if device.type == "cuda" else cpu_note
            echo(f"  {row['case']} {row['dtype']}: fused {row['fused ms']:.3g} ms, naive {row['naive ms']:.3g} ms")
            rows.append(row)
    return rows


def forward_rows(device, d, Ms, dtype, budget, echo) -> list[dict]:
    """The layer's forward with the merged copy against a per-call ``W + prev_delta``."""
    g = torch.Generator(device=device).manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    W, b, P = rnd(d, d, scale=d**-0.5), rnd(d), rnd(d, d, scale=0.01)
    A, B = rnd(RANK, d, scale=d**-0.5), rnd(d, RANK, scale=0.01)
    merged = W + P
    rows = []
    for M in Ms:
        x = rnd(M, d)
        impls = {
            "merged copy": lambda: lowrank_linear(x, merged, b, A.t(), B.t()),
            "dense add": lambda: lowrank_linear(x, W + P, b, A.t(), B.t()),
        }
        row = {"case": f"layer fwd M={M} d={d} r={RANK}", "dtype": str(dtype).replace("torch.", "")}
        with torch.no_grad():
            for name, fn in impls.items():
                row[f"{name} ms"] = time_ms(fn, device, budget_s=budget)
        row["dense add/merged copy"] = row["dense add ms"] / row["merged copy ms"]
        cost = perf.lowrank_linear(M, d, d, RANK, perf.elt_size(dtype))
        row.update(perf.columns(cost, row["merged copy ms"], device))
        echo(f"  {row['case']}: merged {row['merged copy ms']:.3g} ms, dense add {row['dense add ms']:.3g} ms")
        rows.append(row)
    return rows


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    quick = preset == "quick"
    budget = 0.3 if quick else 1.0
    if device.type == "cuda":
        dtypes = (torch.bfloat16, torch.float32)
        fwd_dtype = torch.bfloat16
    else:
        dtypes = (torch.float32,)
        fwd_dtype = torch.float32
    ds = (128, 256) if quick else (768, 4096)
    rows = loss_rows(device, ds, dtypes, budget, echo)
    rows += forward_rows(device, 256 if quick else 1024, (8, 512), fwd_dtype, budget, echo)
    return rows
