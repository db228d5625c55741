"""Continual learning on real data: every method side by side on a stream of text
classification tasks (``share-kernels continual``).

:mod:`.data` (the task stream, read from corpora inside PyPI packages), :mod:`.backbone`
(all-MiniLM-L6-v2, offline, with the frozen bottom cached), :mod:`.methods` (registered continual
methods through ``ContinualLearner``, and the peft LoRA baselines), :mod:`.loop` (training and
evaluation, single process or DDP), :mod:`.report` (metrics, tables, JSON, PNG), :mod:`.run` (the
command). Sits above :mod:`share_kernels.continual`; nothing below imports it.
"""
from .data import CORPORA, DEFAULT_TASKS, Task, load_task, load_tasks
from .loop import Dist, LoopConfig, MethodResult
from .methods import ALL_METHODS, BASELINES
from .report import average_accuracy, backward_transfer, forgetting
from .run import HarnessConfig, run_continual

__all__ = [
    "ALL_METHODS",
    "BASELINES",
    "CORPORA",
    "DEFAULT_TASKS",
    "Dist",
    "HarnessConfig",
    "LoopConfig",
    "MethodResult",
    "Task",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "load_task",
    "load_tasks",
    "run_continual",
]
