"""Benchmark of ``multi_task_linear`` (one batch, one task per row) against, in the same run:

* ``lowrank_linear`` with every row on one task: the single-task roofline;
* ``F.linear`` alone: the base layer;
* HF peft's mixed-batch forward (``adapter_names``) over T LoRA adapters of rank 16 on one
  ``nn.Linear``: what a peft user serves many tasks with;
* a per-row LoRA gather in PyTorch with punica's BGMV semantics (each row gathers its own
  adapter's A (r, d_in) and B (d_out, r): ``y_i += B[id_i] (A[id_i] x_i)``).

Cases: T tasks x rows x id distribution (distinct: row i on task i mod T; uniform; zipf(1.5)
over the T tasks; identical: every row on one task). On CUDA the two kernel strategies are also
timed forced ("gather", "grouped") next to the automatic choice. The last columns are the
bytes each tenant adds per adapted layer: Share ``2 k p`` values (its eps_a, eps_b), LoRA
``r (d_in + d_out)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.lowrank_linear import lowrank_linear
from ..ops.multi_task_linear import choose_strategy, multi_task_linear
from . import model as perf
from .common import rotating, time_ms

NAME = "multi_task_linear"

FULL_T = (1, 16, 256, 1024)
FULL_ROWS = (16, 256, 4096)
DISTS = ("distinct", "uniform", "zipf1.5", "identical")
D = 4096
K = 32
P = 8  # ShareConfig's default pseudo-rank: what a tenant stores
LORA_R = 16
#: peft adapters are built one by one (add_adapter); more than this on a CPU takes minutes.
PEFT_MAX_ADAPTERS_CPU = 256


def shapes(device: torch.device, preset: str):
    """(T list, rows list, dists, d, k, dtype, note)."""
    if preset == "quick":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return (1, 16), (16, 256), ("uniform", "zipf1.5"), 256, 16, dtype, "quick preset"
    if device.type == "cpu":
        # bf16 GEMMs are emulated on this CPU; rows = 4096 at d = 4096 alone takes seconds per call.
        return FULL_T, FULL_ROWS[:2], DISTS, D, K, torch.float32, "cpu: fp32, rows<=256"
    return FULL_T, FULL_ROWS, DISTS, D, K, torch.bfloat16, "bf16"


def make_ids(dist: str, rows: int, T: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "distinct":
        ids = torch.arange(rows) % T
    elif dist == "uniform":
        ids = torch.randint(0, T, (rows,), generator=g)
    elif dist == "zipf1.5":
        p = torch.arange(1, T + 1, dtype=torch.float64) ** -1.5
        ids = torch.multinomial(p / p.sum(), rows, replacement=True, generator=g)
    elif dist == "identical":
        ids = torch.zeros(rows, dtype=torch.long)
    else:
        raise ValueError(f"unknown id distribution {dist!r}; choose from {DISTS}")
    return ids.to(device)


def make_weights(T: int, d: int, k: int, dtype, device, seed: int = 0):
    """W (d, d), b (d,), U (d, k), cores (T, k, k), V (d, k), LoRA A (T, r, d), B (T, d, r)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    return {
        "W": r(d, d, scale=d**-0.5), "b": r(d), "U": r(d, k, scale=d**-0.5), "cores": r(T, k, k, scale=k**-0.5),
        "V": r(d, k), "A": r(T, LORA_R, d, scale=d**-0.5), "B": r(T, d, LORA_R, scale=LORA_R**-0.5),
    }


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_model(w: dict, n_adapters: int):
    """A peft model over one ``nn.Linear`` with ``n_adapters`` LoRA adapters "t0".."t{n-1}" of
    rank 16 (their weights: the first n of w["A"], w["B"]), or None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    W = w["W"]
    lin = nn.Linear(W.shape[1], W.shape[0], device=W.device, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(w["b"])
    config = lambda: LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=["lin"])  # noqa: E731
    model = get_peft_model(_Holder(lin), config(), adapter_name="t0")
    for i in range(1, n_adapters):
        model.add_adapter(f"t{i}", config())
    layer = model.base_model.model.lin
    with torch.no_grad():
        for i in range(n_adapters):
            layer.lora_A[f"t{i}"].weight.copy_(w["A"][i])
            layer.lora_B[f"t{i}"].weight.copy_(w["B"][i])
    return model.eval()


def bgmv_lora(x, W, b, A, B, ids):
    """Per-row LoRA gather (punica BGMV semantics) in PyTorch: y_i = W x_i + b + B[id_i] A[id_i] x_i."""
    t = torch.bmm(A[ids], x[:, :, None])  # (rows, r, 1)
    return F.linear(x, W, b) + torch.bmm(B[ids], t)[:, :, 0]


def _n_sets(rows: int, d: int, dtype, device) -> int:
    """Input sets rotated per call so L2 does not serve them (CUDA); 2 on CPU."""
    if device.type == "cpu":
        return 2
    per_set = (2 * rows * d + d * d) * torch.finfo(dtype).bits // 8
    return max(2, min(4, -(-(128 << 20) // per_set)))


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    Ts, rows_list, dists, d, k, dtype, note = shapes(device, preset)
    budget = 0.2 if preset == "quick" else 1.0
    # A shared CPU preempts whole calls: more repetitions keep the median off the outliers.
    reps = 11 if device.type == "cpu" else 5
    esize = torch.finfo(dtype).bits // 8
    strategies = ("gather", "grouped") if device.type == "cuda" else ()
    rows_out = []
    for T in Ts:
        n_sets = _n_sets(max(rows_list), d, dtype, device)
        ws = [make_weights(T, d, k, dtype, device, seed=s) for s in range(n_sets)]
        n_peft = T if device.type == "cuda" else min(T, PEFT_MAX_ADAPTERS_CPU)
        peft = peft_model(ws[0], n_peft)
        for rows in rows_list:
            xs = [torch.randn(rows, d, device=device, dtype=dtype) for _ in range(n_sets)]
            for dist in dists:
                ids = [make_ids(dist, rows, T, device, seed=s) for s in range(n_sets)]
                sets = [(x, w, i) for x, w, i in zip(xs, ws, ids)]
                # "share": as served (ids checked once per forward by share_kernels.task_ids, or
                # under a CUDA graph); "share+check": the op's own per-call id check (a sync on CUDA).
                impls = {
                    "share": lambda x, w, i: multi_task_linear(
                        x, w["W"], w["b"], w["U"], w["cores"], w["V"], i, check_ids=False),
                    "share+check": lambda x, w, i: multi_task_linear(x, w["W"], w["b"], w["U"], w["cores"], w["V"], i),
                    **{
                        s: (lambda x, w, i, s=s: multi_task_linear(
                            x, w["W"], w["b"], w["U"], w["cores"], w["V"], i, strategy=s, check_ids=False))
                        for s in strategies
                    },
                    "single-task": lambda x, w, i: lowrank_linear(x, w["W"], w["b"], w["U"], w["C0"]),
                    "F.linear": lambda x, w, i: F.linear(x, w["W"], w["b"]),
                    "bgmv": lambda x, w, i: bgmv_lora(x, w["W"], w["b"], w["A"], w["B"], i),
                }
                for w in ws:
                    w["C0"] = w["cores"][0] @ w["V"].t()
                row = {"case": f"T={T} rows={rows} {dist}", "dtype": str(dtype).replace("torch.", "")}
                with torch.no_grad():
                    for name, f in impls.items():
                        call = rotating(f, sets)
                        for _ in range(reps // 4):  # CPU thread pools take a few calls to settle
                            call()
                        row[f"{name} ms"] = time_ms(call, device, min_reps=reps, budget_s=budget)
                    if peft is not None:
                        names = [[f"t{int(t) % n_peft}" for t in i.tolist()] for i in ids]
                        peft_sets = [(x, nm) for x, nm in zip(xs, names)]
                        row["peft ms"] = time_ms(
                            rotating(lambda x, nm: peft(x, adapter_names=nm), peft_sets), device, min_reps=reps, budget_s=budget
                        )
                share = row["share ms"]
                row["chosen"] = choose_strategy(rows, T) if device.type == "cuda" else "reference (cpu)"
                row["share/single"] = share / row["single-task ms"]
                row["share/F.linear"] = share / row["F.linear ms"]
                row["peft/share"] = row["peft ms"] / share if peft is not None else float("nan")
                row["bgmv/share"] = row["bgmv ms"] / share
                row.update(perf.columns(perf.multi_task_linear(rows, d, d, k, T, esize), share, device))
                row["share B/tenant"] = 2 * k * P * esize
                row["lora B/tenant"] = LORA_R * 2 * d * esize
                extra = "" if peft is not None else "; peft not installed"
                if peft is not None and n_peft < T:
                    extra = f"; peft capped at {n_peft} adapters (ids mod {n_peft})"
                row["note"] = note + extra
                echo(f"  {row['case']}: share {share:.3g} ms, single-task {row['single-task ms']:.3g} ms")
                rows_out.append(row)
        del peft
    return rows_out
