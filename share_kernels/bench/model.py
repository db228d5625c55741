"""Performance model printed beside every benchmark row: FLOPs, bytes moved, and the time an
H100 / H200 cannot beat for them (the roofline bound ``max(FLOPs / peak, bytes / bandwidth)``).

Peaks used (dense, no sparsity; NVIDIA's data sheets for the SXM parts):

======  ====================  ======================  ==================
device  bf16 / fp16 tensor    fp32 (no tensor cores)  HBM bandwidth
======  ====================  ======================  ==================
H100    989 TFLOP/s           67 TFLOP/s              3.35 TB/s (HBM3)
H200    989 TFLOP/s           67 TFLOP/s              4.8 TB/s (HBM3e)
======  ====================  ======================  ==================

Bytes are the compulsory traffic of an ideal kernel: every input read once and every output
written once (``elt`` bytes per element); what a real kernel re-reads (a weight per row block,
a shrink per column split) is its distance from the bound. FLOPs count a multiply-add as 2.

On a GPU named H100 or H200 the row also gets ``of bound``: the bound divided by the time
measured (1.0 = at the roofline); elsewhere (CPU, other GPUs) the model alone is printed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: (bf16/fp16 tensor FLOP/s, fp32 FLOP/s, bytes/s)
PEAKS = {
    "H100": (989e12, 67e12, 3.35e12),
    "H200": (989e12, 67e12, 4.8e12),
}


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one call; ``half`` says which compute peak applies (16-bit tensor
    cores, or fp32 FMA)."""

    flops: float
    bytes: float
    half: bool = True

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.half and other.half)

    def times(self, n: float) -> "Cost":
        return Cost(self.flops * n, self.bytes * n, self.half)

    def bound_s(self, device: str) -> float:
        half, fp32, bw = PEAKS[device]
        return max(self.flops / (half if self.half else fp32), self.bytes / bw)

    def bound_by(self, device: str) -> str:
        half, fp32, bw = PEAKS[device]
        return "compute" if self.flops / (half if self.half else fp32) >= self.bytes / bw else "memory"


def elt_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the ops


def linear(M: int, d_in: int, d_out: int, elt: int = 2, bias: bool = True) -> Cost:
    """``F.linear``: x (M, d_in), W (d_out, d_in) read once, y (M, d_out) written once."""
    return Cost(2.0 * M * d_in * d_out, elt * (M * d_in + d_out * d_in + M * d_out + (d_out if bias else 0)), elt == 2)


def lowrank_linear(M: int, d_in: int, d_out: int, k: int, elt: int = 2, bias: bool = True) -> Cost:
    """``F.linear(x, W, b) + (x U) C``: the base GEMM plus the shrink x·U (2·M·d_in·k) and the
    expand t·C (2·M·k·d_out); U and C read once, t never leaves the chip."""
    base = linear(M, d_in, d_out, elt, bias)
    return base + Cost(2.0 * M * k * (d_in + d_out), elt * k * (d_in + d_out), elt == 2)


def multi_task_linear(M: int, d_in: int, d_out: int, k: int, T: int, elt: int = 2, bias: bool = True) -> Cost:
    """``lowrank_linear`` with ``C = core[id] Vᵀ`` per row: + 2·M·k² for the cores, the T cores
    (T·k²) and 8 bytes of id per row read once."""
    return lowrank_linear(M, d_in, d_out, k, elt, bias) + Cost(2.0 * M * k * k, elt * T * k * k + 8 * M, elt == 2)


def project_complement(d: int, n: int, k: int, elt: int = 4) -> Cost:
    """``X - M (Mᵀ X)``: 2·d·k·n for Mᵀ X, 2·d·k·n for M(·), d·n for the subtraction; X read
    once, M read once, the result written once."""
    return Cost(4.0 * d * k * n + d * n, elt * (2 * d * n + d * k), elt == 2)


def stability_loss(d_out: int, d_in: int, r: int, elt: int = 2) -> Cost:
    """``Σ (1 - tanh(αD) tanh(α prev)) D²``, ``D = B A``: 2·d_out·d_in·r for D, ~8 per element
    for the rest (two tanh counted as one FLOP each); prev_delta read once, A and B read once,
    D never written."""
    n = d_out * d_in
    return Cost(2.0 * n * r + 8.0 * n, elt * (n + r * (d_in + d_out)) + 4, elt == 2)


def bert_model(
    method: str,
    tokens: int,
    seq: int,
    k: int,
    *,
    hidden: int,
    inter: int,
    layers: int,
    train: bool = False,
    elt: int = 2,
) -> Cost:
    """A BERT encoder forward (``train``: + the backward to the inputs of every layer and the
    adapters' gradients) with every q, k, v, attention-out, intermediate and output linear adapted.

    ``method``: "dense" (no adapter: merged or folded weights), "lora" / "share" (a low-rank
    path of width k per linear; Share adds a k x k core per row, ~0), "pslora" (LoRA plus the
    stability loss over each d_out x d_in). Per layer: the six linears, attention scores and
    context (2 x 2·tokens·seq·hidden), and ~10 elementwise passes over the (tokens, hidden)
    activations (layer norms, GELU over (tokens, inter), residuals). The backward of a frozen
    base computes input gradients only: one more pass of the same GEMM FLOPs and weight reads.
    """
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter), (inter, hidden)]
    per_layer = Cost(0.0, 0.0)
    for d_in, d_out in shapes:
        if method == "dense":
            per_layer = per_layer + linear(tokens, d_in, d_out, elt)
        else:
            per_layer = per_layer + lowrank_linear(tokens, d_in, d_out, k, elt)
        if method == "pslora" and train:
            per_layer = per_layer + stability_loss(d_out, d_in, k, elt).times(2)  # forward + backward
    attn = Cost(4.0 * tokens * seq * hidden, elt * 4 * tokens * hidden)
    elementwise = Cost(10.0 * tokens * hidden + 8.0 * tokens * inter, elt * (10 * tokens * hidden + 2 * tokens * inter))
    fwd = per_layer + attn + elementwise
    total = fwd.times(2 if train else 1)
    return Cost(total.flops * layers, total.bytes * layers, elt == 2)


# ----------------------------------------------------------------------------- the columns


def gpu_model(device: Optional[torch.device]) -> Optional[str]:
    """"H100" / "H200" when ``device`` is one of them, else None."""
    if device is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((g for g in ("H200", "H100") if g in name), None)


def columns(cost: Cost, measured_ms: Optional[float] = None, device: Optional[torch.device] = None) -> dict:
    """The model's columns for one row: GFLOP, MB moved, arithmetic intensity, the H100 and
    H200 bounds in µs and what bounds them; ``of bound`` (bound / measured) on an H100 / H200."""
    cols = {
        "model GFLOP": cost.flops / 1e9,
        "model MB": cost.bytes / 1e6,
        "FLOP/B": cost.flops / cost.bytes if cost.bytes else float("nan"),
        "H100 bound us": cost.bound_s("H100") * 1e6,
        "H200 bound us": cost.bound_s("H200") * 1e6,
        "bound by": cost.bound_by("H100"),
    }
    gpu = gpu_model(device)
    if gpu is not None and measured_ms:
        cols[f"of {gpu} bound"] = cost.bound_s(gpu) * 1e3 / measured_ms
    return cols


def lowrank_linear_train(M: int, d_in: int, d_out: int, k: int, elt: int = 2) -> Cost:
    """Forward + backward of ``lowrank_linear`` with a frozen base (grads for x, U, C):
    dx = dy W + (dy Cᵀ) Uᵀ (the base GEMM again plus the low-rank pair), dU = xᵀ (dy Cᵀ)
    (2·M·d_in·k), dC = (x U)ᵀ dy (2·M·k·d_out); the backward reads dy, x, W, U, C once and
    writes dx, dU, dC once."""
    fwd = lowrank_linear(M, d_in, d_out, k, elt)
    flops = 2.0 * M * d_in * d_out + 2.0 * M * k * (d_in + d_out) + 2.0 * M * k * (d_in + d_out)
    nbytes = elt * (M * d_out + M * d_in + d_out * d_in + 2 * k * (d_in + d_out) + M * d_in)
    return fwd + Cost(flops, nbytes, elt == 2)


def stability_loss_train(d_out: int, d_in: int, r: int, elt: int = 2) -> Cost:
    """Forward + backward of :func:`stability_loss`: the backward recomputes D tile by tile
    (2·n·r), forms dD (~10 per element) and dA = Bᵀ dD, dB = dD Aᵀ (2·n·r each), reading
    prev_delta a second time."""
    n = d_out * d_in
    backward = Cost(6.0 * n * r + 10.0 * n, elt * (n + 2 * r * (d_in + d_out)), elt == 2)
    return stability_loss(d_out, d_in, r, elt) + backward


def covariance(tokens: int, d: int, elt: int = 4) -> Cost:
    """``Xᵀ X`` of (tokens, d) inputs: 2·tokens·d² FLOPs (d² with symmetry unused), X read once,
    the fp32 (d, d) sum written once."""
    return Cost(2.0 * tokens * d * d, elt * tokens * d + 4 * d * d, elt == 2)


def project_complement_torch(d: int, n: int, k: int, elt: int = 4) -> Cost:
    """The dense PyTorch form ``X - M @ (M.T @ X)`` as three kernels: Mᵀ X (reads X), M (·)
    (writes a (d, n) temporary), the subtraction (reads X and the temporary, writes the out)."""
    flops = 4.0 * d * k * n + d * n
    nbytes = elt * ((d * n + d * k + k * n) + (k * n + d * k + d * n) + 3 * d * n)
    return Cost(flops, nbytes, elt == 2)


def goal_rows(device: str = "H100") -> list[dict]:
    """The README's kernel goals next to what this model allows on ``device`` (bf16, d = 4096):
    the ratio of the ideal kernel's bound to its baseline's bound. A goal below the model's
    ratio cannot be met if the baseline runs at its bound; above it, it leaves that much room."""
    d, rows = 4096, []

    def add(kernel, case, ours, base, goal, baseline):
        ratio = ours.bound_s(device) / base.bound_s(device)
        rows.append({
            "kernel": kernel, "case": case, "baseline": baseline, "goal": goal,
            f"{device} bound us": ours.bound_s(device) * 1e6, "baseline bound us": base.bound_s(device) * 1e6,
            "model ratio": ratio, "bound by": ours.bound_by(device),
        })

    for k in (16, 64):
        for M, goal in ((1, "<= 1.05x"), (16, "<= 1.05x"), (8192, "<= 1.08x")):
            add("lowrank_linear fwd", f"M={M} k={k}", lowrank_linear(M, d, d, k), linear(M, d, d), goal, "F.linear")
    for rows_ in (16, 256, 4096):
        add("multi_task_linear", f"T=1024 rows={rows_} k=32", multi_task_linear(rows_, d, d, 32, 1024),
            lowrank_linear(rows_, d, d, 32), "<= 1.15x", "single task")
    for k in (16, 128, 2048):
        fused, torch_form = project_complement(d, 65536, k, 2), project_complement_torch(d, 65536, k, 2)
        r = {"kernel": "project_complement", "case": f"d={d} n=65536 k={k}", "baseline": "X - M(MᵀX)",
             "goal": ">= 1.2x faster", f"{device} bound us": fused.bound_s(device) * 1e6,
             "baseline bound us": torch_form.bound_s(device) * 1e6,
             "model ratio": fused.bound_s(device) / torch_form.bound_s(device), "bound by": fused.bound_by(device)}
        rows.append(r)
    return rows


if __name__ == "__main__":  # python -m share_kernels.bench.model: the goal table
    from .common import format_table

    for dev in PEAKS:
        print(f"== {dev}: bf16 {PEAKS[dev][0] / 1e12:.0f} TFLOP/s, {PEAKS[dev][2] / 1e12:.2f} TB/s ==")
        print(format_table(goal_rows(dev)))
