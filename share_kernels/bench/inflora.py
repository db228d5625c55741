"""InfLoRA: task-boundary cost, ``begin_task`` + ``end_task`` over every adapted layer of a
12-block, d = 768 model, with the memory projections grouped (one ``project_complement_grouped``
call per mode) against a per-layer loop of ``project_complement``.

The model is a stack of blocks with the linears of a BERT-base layer: q, k, v, o (768 -> 768),
fc1 (768 -> 3072), fc2 (3072 -> 768). "k,v" adapts k and v as the official code does (24
layers); on CUDA the full preset adds "q,k,v,o" (48 layers) and "all" (72 layers, fc2 with a
3072 x 3072 covariance), which take many minutes on a CPU.
One task-boundary pair is ``begin_task`` (covariance pass over the batches, projection, SVD,
``B_t``) plus ``end_task`` (covariance pass, projection, SVD, DualGPM update) for one new task,
timed in the steady state (a first task already learned, so every layer has a memory); each
repetition adds a task, so its median is over a growing memory; the two variants alternate.
The "projection" columns time the projection of every layer's covariance against its memory
alone, where grouping is all that differs.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from ..continual import ContinualLearner
from ..continual.inflora import DualGPM, project_all
from . import model as perf
from .common import sync, time_ms

NAME = "inflora"


class _Block(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        a = torch.sigmoid(self.q(x)) * self.k(x) + self.v(x)  # mixes like attention, cheaply
        x = self.norm(x + self.o(a))
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _model(d: int, h: int, blocks: int, device, dtype) -> nn.Module:
    return nn.Sequential(*(_Block(d, h) for _ in range(blocks))).to(device=device, dtype=dtype)


def _case(device, preset):
    """(label, d, hidden, blocks, targets, batches, tokens per batch)."""
    if preset == "quick":
        return [("k,v", 64, 256, 2, ["k", "v"], 2, 32)]
    cases = [("k,v", 768, 3072, 12, ["k", "v"], 4, 256)]
    if device.type == "cuda":
        cases += [
            ("q,k,v,o", 768, 3072, 12, ["q", "k", "v", "o"], 4, 256),
            ("all", 768, 3072, 12, ["q", "k", "v", "o", "fc1", "fc2"], 4, 256),
        ]
    return cases


def _tokens(n: int, d: int, device, dtype) -> torch.Tensor:
    """(n, d) inputs with a power-law spectrum (σ_i ∝ 1/i), as real features have, so the
    memory keeps a fraction of the dimensions rather than nearly all."""
    Q = torch.linalg.qr(torch.randn(d, d, device=device)).Q
    s = 1.0 / torch.arange(1, d + 1, device=device, dtype=torch.float32)
    return ((torch.randn(n, d, device=device) * s) @ Q.t() * d**0.5).to(dtype)


def _wall_s(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call; on a shared CPU the second is the
    steadier figure."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    """Per case, two copies of the model (grouped, per-layer loop) each learn a first task, then
    alternate task boundaries (so load on a shared machine hits both alike); median wall time."""
    dtype = torch.float32
    reps = 2 if device.type == "cpu" and preset != "quick" else 3
    rows = []
    for label, d, h, blocks, targets, n_batches, tokens in _case(device, preset):
        torch.manual_seed(0)
        base = _model(d, h, blocks, device, dtype)
        batches = [_tokens(tokens, d, device, dtype) for _ in range(n_batches)]
        learners = {}
        for grouped in (True, False):
            learner = ContinualLearner(copy.deepcopy(base), "inflora", target_modules=targets, r=10, total_tasks=20)
            learner.method.grouped = grouped
            learner.begin_task("t0", batches)
            learner.end_task("t0", batches)
            learners[grouped] = learner
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for rep in range(1, reps + 1):
            for grouped, learner in learners.items():
                name = f"t{rep}"
                times[grouped].append(
                    _wall_s(lambda: (learner.begin_task(name, batches), learner.end_task(name, batches)), device)
                )
        results = {}
        for grouped, learner in learners.items():
            ms = statistics.median(t for t, _ in times[grouped]) * 1e3
            cpu_s = statistics.median(c for _, c in times[grouped])
            mems = [DualGPM.from_layer(layer) for layer in learner.layers.values()]
            covs = [torch.randn(m.d, m.d, device=device, dtype=torch.float32) for m in mems]
            proj_ms = time_ms(lambda: (project_all(mems, covs, grouped), sync(device)), device, budget_s=0.3)
            results[grouped] = (ms, cpu_s, proj_ms, len(learner.layers), sum(m.retain for m in mems))
            echo(f"  {label} grouped={grouped}: {ms:.4g} ms per begin+end, projection {proj_ms:.3g} ms")
        for grouped in (True, False):
            ms, cpu_s, proj_ms, n_layers, retain = results[grouped]
            kind = "grouped" if grouped else "per-layer loop"
            # model: per boundary pair two forward passes over the batches and two covariance
            # sums per adapted layer (every target here has d_in = d); SVDs and projections not modeled
            n_tok, elt = n_batches * tokens, perf.elt_size(dtype)
            fwd = perf.linear(n_tok, d, d, elt).times(4 * blocks) + perf.linear(n_tok, d, h, elt).times(blocks)
            fwd = fwd + perf.linear(n_tok, h, d, elt).times(blocks)
            cost = (fwd + perf.covariance(n_tok, d, elt).times(n_layers)).times(2)
            rows.append(
                {
                    "case": f"begin+end {label} ({kind})",
                    "model": f"{blocks}x d={d}",
                    "layers": n_layers,
                    "retain-mode layers": retain,
                    "tokens": n_batches * tokens,
                    "reps": reps,
                    "ms": ms,
                    "vs loop": ms / results[False][0],
                    "process cpu s": cpu_s,
                    "cpu vs loop": cpu_s / results[False][1],
                    "projection ms": proj_ms,
                    "projection vs loop": proj_ms / results[False][2],
                    **perf.columns(cost, ms, device),
                }
            )
    return rows
