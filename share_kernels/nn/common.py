"""Helpers shared by the adapter layers."""
from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Iterator, Mapping, Optional

import torch.nn as nn
from torch import Tensor

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
# Task names key nn.ParameterDicts, which cannot hold a key that shadows one of their methods.
_RESERVED = frozenset(n for n in dir(nn.ParameterDict) if not n.startswith("_"))


#: longest task name: it is part of a file name (``task-<name>.safetensors``, 255 bytes at most)
MAX_TASK_NAME = 100
#: the name ``task_ids`` reads as "no task, the base model" (peft's ``adapter_names``)
BASE_TASK = "__base__"


def check_task_name(name: str) -> None:
    """Task names key parameters and name files: 1 to 100 letters, digits, ``_`` and ``-``
    (not first), so never a path separator; not ``__base__`` (``task_ids``' name for no task)."""
    if not isinstance(name, str):
        raise TypeError(f"invalid task name {name!r}: a task name must be a str, got {type(name).__name__}")
    if len(name) > MAX_TASK_NAME:
        raise ValueError(f"invalid task name {name[:20]!r}...: {len(name)} characters, at most {MAX_TASK_NAME}")
    if not _TASK_NAME.fullmatch(name):
        raise ValueError(
            f"invalid task name {name!r}: use 1 to {MAX_TASK_NAME} letters, digits, '_' and '-' (not as the first "
            "character); no path separators"
        )
    if name == BASE_TASK:
        raise ValueError(f"invalid task name {name!r}: task_ids uses it for the base model")
    if name in _RESERVED:
        raise ValueError(f"invalid task name {name!r}: it is reserved (a method of nn.ParameterDict)")


# Per-forward task ids (``share_kernels.task_ids``): ``{layer: ids}`` in a context variable, so
# each thread (and each asyncio task) sees only the ids its own ``with task_ids(...)`` set;
# two requests served at once on one model never see each other's ids.
_ROUTED: contextvars.ContextVar[Mapping[nn.Module, Tensor]] = contextvars.ContextVar(
    "share_kernels_task_ids", default={}
)


@contextlib.contextmanager
def routed_task_ids(per_layer: Mapping[nn.Module, Tensor]) -> Iterator[None]:
    """Within the block, in this thread / context only, ``current_task_ids(layer)`` returns
    ``per_layer[layer]`` (ids already checked); nested blocks override per layer."""
    token = _ROUTED.set({**_ROUTED.get(), **per_layer})
    try:
        yield
    finally:
        _ROUTED.reset(token)


def current_task_ids(layer: nn.Module) -> Optional[Tensor]:
    """The task ids a ``routed_task_ids`` block of this context set for ``layer``, or None."""
    return _ROUTED.get().get(layer)


class TaskLayer(nn.Module):
    """Task bookkeeping shared by the adapter layers: names in order (``self._tasks``), the
    base ``nn.Linear`` as ``self.base_layer``, and frozen parameters on its device and dtype."""

    _tasks: list[str]
    base_layer: nn.Linear

    @property
    def tasks(self) -> list[str]:
        """Task names in the order added; a name's index is its task id."""
        return list(self._tasks)

    def task_id(self, name: str) -> int:
        self._check_known(name)
        return self._tasks.index(name)

    def _check_known(self, name: str) -> None:
        if name not in self._tasks:
            raise ValueError(f"unknown task {name!r}; this layer has tasks {self._tasks}")

    def _check_new(self, name: str) -> None:
        check_task_name(name)
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; tasks are {self._tasks}")

    def _new_param(self, t: Tensor) -> nn.Parameter:
        """A frozen copy of ``t`` on the base weight's device and dtype (never aliasing ``t``)."""
        w = self.base_layer.weight
        return nn.Parameter(t.detach().to(device=w.device, dtype=w.dtype).clone(), requires_grad=False)
