"""What the loop trains: every registered continual method, and the LoRA baselines.

All runners wrap their own copy of the :class:`~share_kernels.harness.backbone.TopEncoder` and
expose one interface to the loop:

- ``begin_task(name, batches)`` / ``end_task(name, batches)``: the task boundaries (``batches``:
  the task's full training batches as ``(hidden, mask)`` tuples, for methods that need data there);
- ``trainable_parameters()``, ``extra_loss()``: what the optimizer updates and what is added to
  the loss while a task trains;
- ``use_task(name)``: the adapter state with the task id known (task-incremental);
  ``use_latest()``: without a task id (class-incremental): the state after the latest task;
  ``class_incremental`` is False for a runner that cannot predict without a task id;
  ``task_states`` is False when every task uses the same adapter state (one shared LoRA);
- ``stats()``: parameter and storage accounting of the adapters (heads counted separately);
  ``boundary(n)``: after the n-th task, the stored bytes and per-layer state (Share's k,
  InfLoRA's protected dimension and the directions its last ``B_t`` got).

Registered methods (Share, InfLoRA, PS-LoRA, ...) run through
:class:`~share_kernels.continual.ContinualLearner` and nothing else, so a method works here as
soon as it is registered. The baselines use HF peft LoRA.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..continual import ContinualLearner, adapter_stats, get_method
from .backbone import TopEncoder

#: the baselines, trained through HF peft LoRA
BASELINES = ("seq-lora", "per-task-lora", "joint")
#: compositions run as one method: name -> (registered method, the config field that holds the
#: plug-in's options); ``--option inflora+pslora.lam=...`` sets a plug-in option (lam, alpha, merge)
COMPOSED = {"inflora+pslora": ("inflora", "stability")}
#: the plug-in's options (PS-LoRA's :class:`~share_kernels.continual.pslora.StabilityConfig`)
_STABILITY_OPTIONS = ("lam", "alpha", "merge")
#: every method the command knows; continual methods are looked up in the registry at run time
ALL_METHODS = ("share", "inflora", "pslora", "inflora+pslora", *BASELINES)


@dataclass
class AdapterCounts:
    """Adapter parameters (classification heads excluded): trained while one task trains,
    added to storage by each task, and stored once for all tasks."""

    trainable_per_task: int
    stored_per_task: int
    shared: int
    bytes_per_param: int

    def total_bytes(self, n_tasks: int) -> int:
        return (self.shared + n_tasks * self.stored_per_task) * self.bytes_per_param


def target_regex(top: TopEncoder, layers: Sequence[int], modules: Sequence[str]) -> str:
    """Regex over the TopEncoder's module names selecting ``modules`` of encoder ``layers``
    (absolute layer numbers of the backbone)."""
    local = sorted({int(i) - top.first for i in layers})
    if not local or local[0] < 0 or local[-1] >= len(top.layers):
        raise ValueError(f"layers {list(layers)} must lie in [{top.first}, {top.first + len(top.layers)})")
    mods = "|".join(sorted(set(modules)))
    return rf"layers\.({'|'.join(map(str, local))})\..*\.({mods})"


def _lora_per_layer(top: nn.Module, regex: str, r: int) -> int:
    import re

    pattern = re.compile(regex)
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in top.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(n)
    )


def method_defaults(method: str, rank: int, n_tasks: int = 0) -> dict:
    """Config defaults of a registered method in this harness: the LoRA rank where it has one."""
    cls = get_method(method)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    out = {}
    for name in ("r", "rank"):
        if name in fields:
            out[name] = rank
    if method == "share":
        # 2kp = 256 stored per layer and task: 24x below LoRA r=8 here. p = 8 keeps a task's
        # update at the LoRA's rank and φ = 8 temporary directions (trained, not stored) give a
        # new task room outside the subspace; k = 32, p = 4, φ = 2 trailed per-task LoRA by ~2
        # points (README, issue 9 results).
        out.update(k=16, p=8, phi=8)
    if "total_tasks" in fields and n_tasks:
        out["total_tasks"] = n_tasks  # InfLoRA's threshold schedule runs over the stream
    return out


class ContinualRunner:
    """A registered method through :class:`~share_kernels.continual.ContinualLearner`."""

    class_incremental = True
    task_states = True
    joint = False

    def __init__(self, method: str, top: TopEncoder, regex: str, cfg: dict, name: Optional[str] = None):
        self.name = name or method
        self.model = top
        self.learner = ContinualLearner(top, method=method, target_modules=regex, **cfg)

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        self.learner.begin_task(name, batches)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.learner.trainable_parameters()

    def extra_loss(self) -> torch.Tensor:
        return self.learner.extra_loss()

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> Any:
        self.last_report = self.learner.end_task(name, batches)
        return self.last_report

    def boundary(self, n_tasks: int) -> dict:
        out: dict = {"stored_bytes": self.stats().total_bytes(n_tasks)}
        layers = self.learner.layers
        if all(isinstance(getattr(m, "k", None), int) for m in layers.values()):  # Share
            out["k"] = {n: m.k for n, m in layers.items()}
        if all(hasattr(m, "memory_dim") for m in layers.values()):  # InfLoRA
            out["protected"] = {n: m.memory_dim for n, m in layers.items()}
            out["directions"] = dict(getattr(self.last_report, "directions", {}))
        return out

    def use_task(self, name: str) -> None:
        self.learner.set_task(name)

    def use_latest(self) -> None:
        self.learner.set_task(self.learner.tasks[-1])

    def stats(self) -> AdapterCounts:
        s = adapter_stats(self.model)
        return AdapterCounts(s.trainable_per_task, s.stored_per_task, s.shared, s.bytes_per_param)


class LoRARunner:
    """HF peft LoRA baselines (``lora_alpha = r``, no dropout).

    - ``seq-lora``: one adapter, trained on task after task;
    - ``per-task-lora``: a fresh adapter per task, chosen by task id (r adapters stored; no
      prediction without a task id);
    - ``joint``: one adapter trained once on all tasks mixed (the loop handles the data).
    """

    def __init__(self, kind: str, top: TopEncoder, regex: str, rank: int):
        import peft

        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; baselines are {list(BASELINES)}")
        self.name = kind
        self.class_incremental = kind != "per-task-lora"
        self.task_states = kind == "per-task-lora"
        self.joint = kind == "joint"
        self._peft = peft
        self._cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=regex)
        self._per_layer = _lora_per_layer(top, regex, rank)
        self._bytes = next(top.parameters()).element_size()
        self._base = top
        self.model: Optional[nn.Module] = None
        self.tasks: list[str] = []

    def _adapter(self, name: str) -> str:
        return name if self.name == "per-task-lora" else "default"

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        adapter = self._adapter(name)
        if self.model is None:
            self.model = self._peft.get_peft_model(self._base, self._cfg, adapter_name=adapter)
        elif self.name == "per-task-lora":
            self.model.add_adapter(adapter, self._cfg)
        self.tasks.append(name)
        self._activate(adapter, train=True)

    def _activate(self, adapter: str, train: bool) -> None:
        self.model.base_model.set_adapter(adapter)
        for n, p in self.model.named_parameters():
            p.requires_grad_(train and "lora_" in n and f".{adapter}." in n)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        self._activate(self._adapter(name), train=False)

    def use_task(self, name: str) -> None:
        self._activate(self._adapter(name), train=False)

    def use_latest(self) -> None:
        if not self.class_incremental:
            raise ValueError("per-task-lora needs a task id")
        self._activate(self._adapter(self.tasks[-1]), train=False)

    def boundary(self, n_tasks: int) -> dict:
        return {"stored_bytes": self.stats().total_bytes(n_tasks)}

    def stats(self) -> AdapterCounts:
        per = self._per_layer
        if self.name == "per-task-lora":
            return AdapterCounts(per, per, 0, self._bytes)
        return AdapterCounts(per, 0, per, self._bytes)


def make_runner(method: str, top: TopEncoder, regex: str, rank: int, overrides: Optional[dict] = None, n_tasks: int = 0):
    """The runner for ``method``: a baseline, or a registered continual method (ValueError
    naming the registered ones when it is neither)."""
    if method in BASELINES:
        if overrides:
            raise ValueError(f"{method} takes no method options; got {overrides}")
        return LoRARunner(method, top, regex, rank)
    if method in COMPOSED:
        # e.g. inflora+pslora: InfLoRA with PS-LoRA's stability loss and magnitude merge on A_t
        base, field = COMPOSED[method]
        over = dict(overrides or {})
        plug = {k: over.pop(k) for k in _STABILITY_OPTIONS if k in over}
        cfg = {**method_defaults(base, rank, n_tasks), field: plug, **over}
        return ContinualRunner(base, top, regex, cfg, name=method)
    cfg = {**method_defaults(method, rank, n_tasks), **(overrides or {})}
    return ContinualRunner(method, top, regex, cfg)
