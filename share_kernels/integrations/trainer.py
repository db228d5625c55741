"""``ContinualTrainer``: the transformers ``Trainer`` over a stream of tasks, one ``train()`` per task.

Per task, :meth:`ContinualTrainer.train_task` (or :meth:`ContinualTrainer.train_tasks` over a
stream):

1. ``learner.begin_task(name, batches)``, with the first ``boundary_batches`` batches of the
   task's training set (InfLoRA designs ``B_t`` from them; Share and PS-LoRA ignore them). The
   batches come from an unshuffled, unsharded loader, so every process of a distributed run
   sees the same data and builds the same adapters;
2. the optimizer, the scheduler and the DDP wrapper are dropped, so ``train()`` builds them again
   on the new task's trainable parameters (only those require grad);
3. ``trainer.train()``, with ``learner.extra_loss()`` (PS-LoRA's stability loss) added to every
   training loss in :meth:`compute_loss`;
4. ``learner.end_task(name, batches)`` (Share's consolidation, InfLoRA's memory, PS-LoRA's merge);
5. ``save_adapters(model, save_dir)`` on the main process, when ``save_dir`` is given.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
from transformers import Trainer

from ..continual.io import save_adapters
from ..continual.learner import ContinualLearner


@dataclass
class TaskSpec:
    """One task of a stream: its name, training set, and optional keyword arguments of ``train()``."""

    name: str
    train_dataset: Any
    eval_dataset: Any = None


class ContinualTrainer(Trainer):
    """A ``transformers.Trainer`` that learns tasks in turn through a :class:`ContinualLearner`.

    Args:
        learner: the learner of ``model`` (``ContinualLearner(model, method, target_modules, ...)``).
        save_dir: where :func:`~share_kernels.save_adapters` writes after each task (str or
            os.PathLike); None: no saving.
        boundary_batches: how many training batches the task boundary sees (InfLoRA).
        Everything else as ``Trainer`` (``model`` defaults to ``learner.model``).
    """

    def __init__(
        self,
        *args,
        learner: ContinualLearner,
        save_dir: Optional[Union[str, os.PathLike]] = None,
        boundary_batches: int = 8,
        **kwargs,
    ):
        if not isinstance(learner, ContinualLearner):
            raise TypeError(f"learner must be a share_kernels.ContinualLearner; got {type(learner).__name__}")
        if isinstance(boundary_batches, bool) or not isinstance(boundary_batches, int) or boundary_batches < 1:
            raise ValueError(f"boundary_batches must be a positive int; got {boundary_batches!r}")
        if not args and "model" not in kwargs:
            kwargs["model"] = learner.model
        super().__init__(*args, **kwargs)
        if self.model is not learner.model:
            raise ValueError("the Trainer's model must be the learner's model (learner.model)")
        self.learner = learner
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.boundary_batches = boundary_batches
        #: what each train_task returned: {"task", "train", "end_task"} per task, in order
        self.task_results: list[dict] = []

    # ----------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if not model.training or self.learner.current_task is None:
            return out
        loss, rest = (out[0], out[1]) if return_outputs else (out, None)
        extra = self.learner.extra_loss().to(loss.device, loss.dtype)
        if self._loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
            # Trainer will not divide this loss by the accumulation steps (the model already
            # normalised it over the whole accumulated batch): divide the per-micro-batch
            # regulariser here, so it counts once per optimizer step, not G times
            extra = extra / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = loss + extra
        return (loss, rest) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Trainer.training_step's own test of whether it skips dividing the loss by the
        gradient accumulation steps."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        by_model = getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        return bool(by_model or getattr(self, "compute_loss_func", None) is not None)

    # ----------------------------------------------------------------- tasks

    def _boundary_batches(self, dataset) -> list:
        """The first ``boundary_batches`` batches of ``dataset``, unshuffled, on the model's device."""
        if dataset is None:
            return []
        # a datasets.Dataset loses the columns the model does not take, as Trainer's loaders do
        ds = self._remove_unused_columns(dataset, "task boundary") if hasattr(dataset, "column_names") else dataset
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.args.per_device_train_batch_size, shuffle=False, collate_fn=self.data_collator
        )
        out = []
        for batch in loader:
            out.append(self._prepare_inputs(batch))
            if len(out) == self.boundary_batches:
                break
        return out

    def train_task(self, name: str, train_dataset, eval_dataset=None, **train_kwargs) -> dict:
        """Learn task ``name`` on ``train_dataset`` (steps 1-5 of the module doc); returns
        ``{"task": name, "train": TrainOutput, "end_task": the method's report}``."""
        batches = self._boundary_batches(train_dataset)
        self.learner.begin_task(name, batches)
        self.train_dataset = train_dataset
        if eval_dataset is not None:
            self.eval_dataset = eval_dataset
        # a new optimizer, scheduler and DDP wrapper over this task's parameters
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        train_out = self.train(**train_kwargs)
        report = self.learner.end_task(name, batches)
        if self.save_dir is not None:
            if self.is_world_process_zero():
                save_adapters(self.model, self.save_dir)
            self.accelerator.wait_for_everyone()
        result = {"task": name, "train": train_out, "end_task": report}
        self.task_results.append(result)
        return result

    def train_tasks(self, tasks: Iterable[Union[TaskSpec, tuple]], **train_kwargs) -> list[dict]:
        """:meth:`train_task` over a stream of :class:`TaskSpec` or ``(name, train_dataset)`` pairs."""
        out = []
        for t in tasks:
            spec = t if isinstance(t, TaskSpec) else TaskSpec(*t)
            out.append(self.train_task(spec.name, spec.train_dataset, spec.eval_dataset, **train_kwargs))
        return out
