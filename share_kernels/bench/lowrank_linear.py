"""Benchmark of ``lowrank_linear`` against ``F.linear`` alone (the roofline), the unfused
PyTorch reference and HF peft's LoRA layer of rank k, forward and training step.

The training step is a frozen base (weight and bias without grad) with gradients for x, U and
C (for peft: x, lora_A, lora_B), as in a mid-network adapted layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.lowrank_linear import lowrank_linear, lowrank_linear_reference
from . import model as perf
from .common import copy_bandwidth_gbs, rotating, time_ms

NAME = "lowrank_linear"

FULL_M = (1, 16, 128, 2048, 8192)
FULL_K = (16, 64)
D = 4096


def shapes(device: torch.device, preset: str):
    """(M list, d, k list, dtype, note) for a preset on a device."""
    if preset == "quick":
        return (1, 16, 128), 256, (16,), torch.float32 if device.type == "cpu" else torch.bfloat16, "quick preset"
    if device.type == "cpu":
        # bf16 GEMMs on this CPU are emulated and M=8192 alone takes minutes: fp32, M <= 2048.
        return FULL_M[:-1], D, FULL_K, torch.float32, "cpu: fp32, M<=2048"
    return FULL_M, D, FULL_K, torch.bfloat16, "bf16"


def make_inputs(M: int, d: int, k: int, dtype, device, seed: int = 0):
    """x (M, d), W (d, d), b (d,), U (d, k), C (k, d), scaled so both terms are O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    return r(M, d), r(d, d, scale=d**-0.5), r(d), r(d, k, scale=d**-0.5), r(k, d, scale=k**-0.5)


def peft_layer(W, b, U, C):
    """HF peft's LoRA layer over the same base with the same low-rank product, or None without peft.

    Built through ``get_peft_model`` (the public API) so it works across peft versions.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    d_out, d_in = W.shape
    k = U.shape[1]
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(d_in, d_out, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        holder.lin.weight.copy_(W)
        holder.lin.bias.copy_(b)
    config = LoraConfig(r=k, lora_alpha=k, lora_dropout=0.0, target_modules=["lin"])  # scaling 1
    layer = get_peft_model(holder, config).base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(U.t())
        layer.lora_B["default"].weight.copy_(C.t())
    return layer


def _n_sets(M, d, k, dtype, device) -> int:
    """Enough independent input sets that their total exceeds 128 MB (well past any L2)."""
    if device.type == "cpu":
        return 2
    per_set = (M * d + d * d + 2 * d * k + M * d) * torch.finfo(dtype).bits // 8
    return max(2, min(8, -(-(128 << 20) // per_set)))


# Each impl returns (y, the tensors a training step differentiates).
IMPLS = {
    "fused": lambda x, W, b, U, C, p: (lowrank_linear(x, W, b, U, C), (x, U, C)),
    "F.linear": lambda x, W, b, U, C, p: (F.linear(x, W, b), (x,)),
    "reference": lambda x, W, b, U, C, p: (lowrank_linear_reference(x, W, b, U, C), (x, U, C)),
    "peft": lambda x, W, b, U, C, p: (p(x), (x, p.lora_A["default"].weight, p.lora_B["default"].weight)),
}
MODES = ("fwd", "train")


def make_case(M: int, d: int, k: int, dtype, device):
    """Rotating input sets for one shape and a peft layer per set (None entries without peft)."""
    sets = [make_inputs(M, d, k, dtype, device, seed=i) for i in range(_n_sets(M, d, k, dtype, device))]
    return sets, [peft_layer(W, b, U, C) for _, W, b, U, C in sets]


def case_fn(impl: str, mode: str, sets, peft):
    """A no-argument callable running ``impl`` in ``mode`` on the next input set each call."""
    return rotating(_step(IMPLS[impl], mode), _args(sets, peft, mode))


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    Ms, d, ks, dtype, note = shapes(device, preset)
    budget = 0.3 if preset == "quick" else 1.0
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for k in ks:
        for M in Ms:
            sets, peft = make_case(M, d, k, dtype, device)
            peft_ok = peft[0] is not None
            for mode in MODES:
                row = {"case": f"{mode} M={M} k={k}", "dtype": str(dtype).replace("torch.", "")}
                for impl in IMPLS:
                    if impl != "peft" or peft_ok:
                        row[f"{impl} ms"] = time_ms(case_fn(impl, mode, sets, peft), device, budget_s=budget)
                fused = row["fused ms"]
                row["fused/F.linear"] = fused / row["F.linear ms"]
                row["reference/fused"] = row["reference ms"] / fused
                row["peft/fused"] = row["peft ms"] / fused if peft_ok else float("nan")
                if mode == "fwd" and M <= 16:
                    x, W, b, U, C = sets[0]
                    nbytes = sum(t.numel() * t.element_size() for t in (x, W, b, U, C)) + M * d * x.element_size()
                    row["fused GB/s"] = nbytes / (fused * 1e-3) / 1e9
                    row["copy GB/s"] = copy_gbs
                    row["fused/copy bw"] = row["fused GB/s"] / copy_gbs
                cost = (perf.lowrank_linear if mode == "fwd" else perf.lowrank_linear_train)(
                    M, d, d, k, perf.elt_size(dtype)
                )
                row.update(perf.columns(cost, fused, device))  # the model of the fused kernel's work
                row["note"] = note if peft_ok else note + "; peft not installed"
                echo(f"  {row['case']}: fused {fused:.3g} ms")
                rows.append(row)
    return rows


def _args(sets, peft, mode):
    """Per-set arguments and the output gradient; for training, leaves that require grad."""
    out = []
    for (x, W, b, U, C), p in zip(sets, peft):
        if mode == "train":
            x, U, C = (t.detach().clone().requires_grad_() for t in (x, U, C))
            if p is not None:
                p.lora_A["default"].weight.requires_grad_(True)
                p.lora_B["default"].weight.requires_grad_(True)
        gy = torch.randn(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
        out.append((x, W, b, U, C, p, gy))
    return out


def _step(f, mode):
    if mode == "fwd":

        def fwd(x, W, b, U, C, p, gy):
            with torch.no_grad():
                return f(x, W, b, U, C, p)[0]

        return fwd

    def train(x, W, b, U, C, p, gy):
        y, leaves = f(x, W, b, U, C, p)
        return torch.autograd.grad(y, leaves, gy)

    return train
