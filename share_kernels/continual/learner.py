"""``ContinualLearner``: five calls around the user's own training loop, for every method."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..nn.common import check_task_name
from .method import get_method
from .wrap import (
    CONFIG_ATTR,
    FrozenParameters,
    TargetModules,
    adapter_layers,
    find_config,
    model_method,
    wrap_and_report,
)


def set_task(model: nn.Module, name: Optional[str]) -> None:
    """Make task ``name`` the one every adapter layer of ``model`` uses in its forward (None: the
    base model alone, bit for bit), for every method; no learner needed (e.g. after
    ``load_adapters`` / ``from_pretrained``). Its parameters become the trainable adapter ones.
    ValueError naming the tasks when ``name`` is unknown."""
    method_cls, config, layers = model_method(model)
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"set_task: name must be a task name (str) or None; got {type(name).__name__}")
        lacking = [n for n, layer in layers.items() if name not in layer.tasks]
        if lacking:
            tasks = next(iter(layers.values())).tasks
            partly = f" (layers without it: {lacking[:4]})" if len(lacking) < len(layers) else ""
            raise ValueError(f"unknown task {name!r}; tasks are {tasks}{partly}")
    method_cls(layers, config).set_task(name)


class ContinualLearner:
    """Learn a stream of tasks on ``model`` with ``method`` ("share", or any registered method).

    With ``target_modules`` the model's matching ``nn.Linear`` layers are wrapped first (see
    :func:`~share_kernels.continual.wrap`; ``keep_trainable`` as there, and :attr:`frozen` says
    what wrapping froze); without, the model must be wrapped already (by ``wrap`` or
    ``load_adapters``) and ``cfg`` overrides fields of its recorded config.

    Per task, with your own loop::

        learner.begin_task(name)                   # add the task, make it the trainable one
        opt = torch.optim.AdamW(learner.trainable_parameters(), lr=...)
        ...  loss = task_loss + learner.extra_loss(); loss.backward(); opt.step()
        report = learner.end_task(name)            # the method's task-boundary step
        learner.set_task(name_or_None)             # choose the task the forward uses

    Create the optimizer after ``begin_task``: the trainable parameters change per task.
    ``batches`` (an iterable of model inputs) is for methods that need data at a task
    boundary; Share ignores it.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "share",
        target_modules: Optional[TargetModules] = None,
        *,
        keep_trainable: Optional[TargetModules] = None,
        **cfg: Any,
    ):
        method_cls = get_method(method)
        #: what wrapping froze (None when the model came wrapped)
        self.frozen: Optional[FrozenParameters] = None
        if target_modules is not None:
            self.frozen = wrap_and_report(model, method, target_modules, keep_trainable, **cfg)
        elif keep_trainable is not None:
            raise ValueError("keep_trainable is applied when wrapping: pass target_modules too, or unfreeze yourself")
        elif not adapter_layers(model):
            raise ValueError("target_modules is required: the model has no adapter layers yet")
        found, config, layers = model_method(model)
        if found is not method_cls:
            raise ValueError(f"the model is wrapped with method {found.name!r}, not {method!r}")
        if cfg and target_modules is None:
            config = dataclasses.replace(config, **cfg)
        self.model = model
        self.layers = layers
        self.method = method_cls(layers, config)
        self.method.model = model
        # the config goes back where it was found (wrap / load_adapters may have been given a submodule)
        setattr(model.get_submodule(find_config(model)[0]), CONFIG_ATTR, config)
        #: the task between begin_task and end_task, if any
        self.current_task: Optional[str] = None
        #: what each end_task returned (Share: ConsolidationReport), in task order
        self.reports: list[Any] = []

    @property
    def config(self) -> Any:
        return self.method.config

    @property
    def tasks(self) -> list[str]:
        """Task names in task-id order."""
        return next(iter(self.layers.values())).tasks

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        """Add task ``name`` and make it the active task, its parameters the trainable ones."""
        if self.current_task is not None:
            raise ValueError(f"task {self.current_task!r} is in progress; end_task({self.current_task!r}) first")
        check_task_name(name)
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists; tasks are {self.tasks}")
        self.method.begin_task(name, batches)
        self.current_task = name

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimize for the task in progress (adapter parameters only)."""
        return self.method.trainable_parameters()

    def extra_loss(self) -> torch.Tensor:
        """A scalar to add to the task loss (0 for Share)."""
        return self.method.extra_loss()

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> Any:
        """Finish task ``name`` with the method's task-boundary step; returns its report."""
        if self.current_task is None:
            raise ValueError(f"no task is in progress; begin_task({name!r}) first")
        if name != self.current_task:
            raise ValueError(f"task {self.current_task!r} is in progress, not {name!r}")
        report = self.method.end_task(name, batches)
        self.current_task = None
        self.reports.append(report)
        return report

    def set_task(self, name: Optional[str]) -> None:
        """Make ``name`` the task the forward uses (None: the base model alone); the same as
        the module-level :func:`set_task`."""
        if name is not None and name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; tasks are {self.tasks}")
        self.method.set_task(name)
