"""Glue to other libraries' APIs: the transformers ``Trainer`` over a stream of tasks
(:class:`ContinualTrainer`) and ``generate`` with a task per row (:func:`generate_with_tasks`).

Uses :mod:`share_kernels.continual` and :mod:`share_kernels.nn`; nothing below imports it.
transformers is imported on first use of a name here.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ContinualTrainer": ".trainer",
    "TaskSpec": ".trainer",
    "expand_task_names": ".generation",
    "generate_with_tasks": ".generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
