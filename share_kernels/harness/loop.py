"""The training / evaluation loop, single process or DDP, and the continual-learning metrics.

Protocol. Each task t has its own head block (``H -> C_t``), trained with that task only
(cross-entropy over its own classes, the old classes masked out as in the InfLoRA and CODA-Prompt
code; ``head_loss="seen"``: over every class seen so far, the old blocks frozen in the softmax;
the other blocks are never in the optimizer). After training
task i the loop fills two accuracy matrices, row i, columns j <= i:

- task-incremental: the task id is known: adapter state ``use_task(j)``, argmax over task j's
  head block;
- class-incremental: no task id: adapter state after the latest task (``use_latest()``),
  argmax over the concatenated head blocks of tasks 0..i (every class seen so far); correct
  when it is task j's block and the right class.

``joint`` trains one adapter and all heads once on every task mixed, with cross-entropy over
all classes; it fills only the last row. Budget: every method runs ``epochs x ceil(n_t / B)``
optimizer steps for task t (joint: their sum), AdamW, linear warm-up over the first 10 % of a
run's steps, then linear decay to 0; batches are drawn from one permutation per epoch seeded by
``(seed, task, epoch)``.

DDP (``torchrun --nproc_per_node N``, gloo): every rank builds the same model (same seeds) and
draws the same global batch; rank r takes rows ``r::N`` of it, its loss is the sum over those
rows divided by the global batch size (plus ``extra_loss() / N``: it depends on the parameters
only, so each rank adds a share), and the gradients of the trainable parameters and the head are
summed over ranks before each step (gathered and added in rank order, so every rank holds the
same bits). The update equals the single-process one up to float rounding. Task boundaries (InfLoRA's covariance, ...) see the full, unsharded batches on every
rank. Evaluation shards the test set and sums the correct counts.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Encoded
from .data import Task


class Dist:
    """Rank and world size; gradient and count reductions (no-ops in a single process)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank :: self.world]

    def _sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum of ``flat`` over ranks, added in rank order on every rank: bitwise the same
        result everywhere (an all-reduce may round differently on different ranks, and a
        method whose task boundary takes an SVD can turn that into different models)."""
        parts = [torch.empty_like(flat) for _ in range(self.world)]
        self._dist.all_gather(parts, flat)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def sum_grads(self, params: Sequence[nn.Parameter]) -> None:
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._sum(torch.cat([g.reshape(-1) for g in grads]))
        o = 0
        for p, g in zip(params, grads):
            p.grad = flat[o : o + g.numel()].view_as(g).clone()
            o += g.numel()

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        return self._sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_ints(self, values: list[int]) -> list[int]:
        return [int(round(v)) for v in self.sum_floats([float(v) for v in values])]


def _seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 10 % of ``total`` steps, then linear decay to 0."""
    warm = max(1, total // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * max(0.0, (total - step) / max(1, total - warm))


@dataclass
class TrainData:
    """One task's (or the joint union's) cached inputs and labels."""

    name: str
    x: Encoded
    y: torch.Tensor  # labels within the task (or global labels for joint)

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The full training set in fixed order, as model inputs ``{"hidden", "attention_mask"}``
        (a dict, so that methods reading inputs at task boundaries can leave padding out)."""
        out = []
        for s in range(0, len(self.y), batch_size):
            h, m = self.x.batch(torch.arange(s, min(s + batch_size, len(self.y))))
            out.append({"hidden": h, "attention_mask": m})
        return out


@dataclass
class LoopConfig:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 64
    #: "own": a task's loss is over its own classes; "seen": over every class seen so far
    head_loss: str = "own"


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    head: Callable[[torch.Tensor], torch.Tensor],
    data: TrainData,
    cfg: LoopConfig,
    dist: Dist,
    extra_loss: Callable[[], torch.Tensor],
    progress=None,
    total: Optional[int] = None,
) -> list[float]:
    """``total`` AdamW steps over ``data`` (default ``epochs x ceil(n / B)``), one permutation
    per epoch seeded by ``(seed, data.name, epoch)``; returns the global loss of each step."""
    n = len(data.y)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch if total is None else total
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, step, epoch = [], 0, 0
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(cfg.seed, data.name, epoch)))
        for s in range(0, n, cfg.batch_size):
            if step >= total:
                break
            chunk = perm[s : s + cfg.batch_size]
            local = dist.shard(chunk)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr)
            opt.zero_grad(set_to_none=True)
            if len(local):
                logits = head(model(*data.x.batch(local)))
                loss = F.cross_entropy(logits, data.y[local], reduction="sum") / len(chunk)
            else:
                loss = params[0].sum() * 0.0
            loss = loss + extra_loss() / dist.world
            loss.backward()
            dist.sum_grads(params)
            opt.step()
            losses.append(dist.sum_floats([float(loss.detach())])[0])  # the global batch's loss
            step += 1
            if progress is not None:
                progress.update(1)
        epoch += 1
    model.eval()
    return losses


@torch.no_grad()
def features(model: nn.Module, x: Encoded, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Pooled features (len(idx), H) of rows ``idx`` of ``x``."""
    out = [model(*x.batch(idx[s : s + batch])) for s in range(0, len(idx), batch)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def predict(feats: torch.Tensor, heads: Sequence[nn.Linear]) -> torch.Tensor:
    """Argmax over the concatenated ``heads``."""
    if not len(feats):
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([h(feats) for h in heads], -1).argmax(-1)


@dataclass
class MethodResult:
    """Everything measured for one method (accuracy in [0, 1]; None where undefined)."""

    method: str
    status: str = "ok"
    task_incremental: Optional[list[list[Optional[float]]]] = None
    class_incremental: Optional[list[list[Optional[float]]]] = None
    trainable_per_task: Optional[int] = None
    stored_bytes_per_task: Optional[int] = None
    shared_bytes: Optional[int] = None
    stored_bytes_total: Optional[int] = None
    head_params_per_task: Optional[list[int]] = None
    wall_s: Optional[float] = None
    train_s: Optional[float] = None
    losses: Optional[list[list[float]]] = field(default=None)  # per task (joint: one run), the loss of every step
    #: per finished task, the runner's state after it (``runner.boundary``): total stored bytes,
    #: and per layer Share's k / InfLoRA's protected dimension and B_t directions
    after_task: Optional[list[dict]] = field(default=None)


def _empty(n: int) -> list[list[Optional[float]]]:
    return [[None] * n for _ in range(n)]


def _make_head(d: int, c: int, seed: int, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).to(dtype)


def run_method(
    runner,
    tasks: Sequence[Task],
    train_sets: Sequence[TrainData],
    test_sets: Sequence[tuple[Encoded, torch.Tensor]],
    cfg: LoopConfig,
    dist: Dist,
    dtype: torch.dtype,
    hidden: int,
    progress_factory=None,
) -> MethodResult:
    """Train ``runner`` on the stream and fill its accuracy matrices."""
    t0 = time.perf_counter()
    T = len(tasks)
    res = MethodResult(runner.name, task_incremental=_empty(T), class_incremental=_empty(T) if runner.class_incremental else None)
    heads = [_make_head(hidden, t.num_classes, _seed(cfg.seed, "head", t.name), dtype) for t in tasks]
    for h in heads:
        h.requires_grad_(False)
    offsets = [sum(t.num_classes for t in tasks[:j]) for j in range(T)]
    steps = [cfg.epochs * math.ceil(len(d.y) / cfg.batch_size) for d in train_sets]
    bar = progress_factory(total=sum(steps), desc=runner.name) if progress_factory else None
    train_s = 0.0
    losses: list[list[float]] = []
    res.after_task = []

    def evaluate(row: int, upto: int) -> None:
        for j in range(upto + 1):
            x, y = test_sets[j]
            idx = dist.shard(torch.arange(len(y)))
            runner.use_task(tasks[j].name)
            feats = features(runner.model, x, idx, cfg.eval_batch_size)
            ok_ti = int((predict(feats, [heads[j]]) == y[idx]).sum())
            ok_ci = 0
            if runner.class_incremental:
                if runner.task_states and j != upto:  # else the latest state is the one just used
                    runner.use_latest()
                    feats = features(runner.model, x, idx, cfg.eval_batch_size)
                ok_ci = int((predict(feats, heads[: upto + 1]) == y[idx] + offsets[j]).sum())
            ok_ti, ok_ci = dist.sum_ints([ok_ti, ok_ci])
            res.task_incremental[row][j] = ok_ti / len(y)
            if runner.class_incremental:
                res.class_incremental[row][j] = ok_ci / len(y)

    if runner.joint:
        joint = _joint_data(tasks, train_sets, offsets)
        torch.manual_seed(_seed(cfg.seed, runner.name, "begin"))
        runner.begin_task("joint", None)
        for h in heads:
            h.requires_grad_(True)
        params = runner.trainable_parameters() + [p for h in heads for p in h.parameters()]
        ts = time.perf_counter()
        # the same number of steps as the stream in total: sum over tasks of epochs * ceil(n_t / B)
        head = lambda f: torch.cat([h(f) for h in heads], -1)  # noqa: E731
        losses.append(train(runner.model, params, head, joint, cfg, dist, runner.extra_loss, bar, total=sum(steps)))
        train_s += time.perf_counter() - ts
        runner.end_task("joint", None)
        res.after_task.append(runner.boundary(T))
        for h in heads:
            h.requires_grad_(False)
        evaluate(T - 1, T - 1)
    else:
        for i, (task, data) in enumerate(zip(tasks, train_sets)):
            batches = data.batches(cfg.batch_size)
            torch.manual_seed(_seed(cfg.seed, runner.name, task.name, "begin"))
            runner.begin_task(task.name, batches)
            heads[i].requires_grad_(True)
            params = runner.trainable_parameters() + list(heads[i].parameters())
            if cfg.head_loss == "seen":  # softmax over every class so far; old heads frozen
                seen = heads[: i + 1]
                head = lambda f, seen=seen: torch.cat([h(f) for h in seen], -1)  # noqa: E731
                data = TrainData(data.name, data.x, data.y + offsets[i])
            else:
                head = heads[i]
            ts = time.perf_counter()
            losses.append(train(runner.model, params, head, data, cfg, dist, runner.extra_loss, bar))
            train_s += time.perf_counter() - ts
            heads[i].requires_grad_(False)
            runner.end_task(task.name, batches)
            res.after_task.append(runner.boundary(i + 1))
            evaluate(i, i)
    if bar is not None:
        bar.close()
    s = runner.stats()
    res.trainable_per_task = s.trainable_per_task
    res.stored_bytes_per_task = s.stored_per_task * s.bytes_per_param
    res.shared_bytes = s.shared * s.bytes_per_param
    res.stored_bytes_total = s.total_bytes(T)
    res.head_params_per_task = [sum(p.numel() for p in h.parameters()) for h in heads]
    res.train_s = train_s
    res.wall_s = time.perf_counter() - t0
    res.losses = losses
    return res


def _joint_data(tasks: Sequence[Task], train_sets: Sequence[TrainData], offsets: Sequence[int]) -> TrainData:
    hidden = [d.x.hidden for d in train_sets]
    t = max(h.shape[1] for h in hidden)
    pad = lambda a: F.pad(a, (0, 0, 0, t - a.shape[1])) if a.dim() == 3 else F.pad(a, (0, t - a.shape[1]))
    x = Encoded(torch.cat([pad(d.x.hidden) for d in train_sets]), torch.cat([pad(d.x.mask) for d in train_sets]))
    y = torch.cat([d.y + off for d, off in zip(train_sets, offsets)])
    return TrainData("joint", x, y)
