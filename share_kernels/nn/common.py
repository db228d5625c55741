"""Helpers shared by the adapter layers."""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
# Task names key nn.ParameterDicts, which cannot hold a key that shadows one of their methods.
_RESERVED = frozenset(n for n in dir(nn.ParameterDict) if not n.startswith("_"))


def check_task_name(name: str) -> None:
    """Task names key parameters and name files: letters, digits, ``_`` and ``-`` (not first)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ValueError(f"invalid task name {name!r}: use letters, digits, '_' and '-' (not as the first character)")
    if name in _RESERVED:
        raise ValueError(f"invalid task name {name!r}: it is reserved (a method of nn.ParameterDict)")


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


# ------------------------------------------------------------------ output slices of a fused projection


def check_out_slices(out_slices, d_out: Optional[int], where: str = "InfLoRALinear") -> Optional[list[list[int]]]:
    """``out_slices`` as sorted, disjoint ``[start, stop]`` lists within [0, d_out] (None: all rows;
    ``d_out`` None: no upper bound yet); ValueError naming the slice and d_out otherwise."""
    if out_slices is None:
        return None
    if isinstance(out_slices, (str, bytes)) or not isinstance(out_slices, Sequence) or not out_slices:
        raise ValueError(f"{where}: out_slices must be a non-empty list of [start, stop] pairs; got {out_slices!r}")
    out = []
    for sl in out_slices:
        ok = isinstance(sl, Sequence) and len(sl) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in sl)
        if not ok or not 0 <= sl[0] < sl[1] or (d_out is not None and sl[1] > d_out):
            bound = "" if d_out is None else f" <= d_out={d_out}"
            raise ValueError(f"{where}: out_slices entry {sl!r} must be [start, stop] ints with 0 <= start < stop{bound}")
        out.append([int(sl[0]), int(sl[1])])
    out.sort()
    for a, b in zip(out, out[1:]):
        if b[0] < a[1]:
            raise ValueError(f"{where}: out_slices {a} and {b} overlap")
    return out


def slice_index(out_slices: Optional[list[list[int]]], device) -> Optional[Tensor]:
    """Row indices of several slices (None for no slices or one: that one is a view)."""
    if out_slices is None or len(out_slices) == 1:
        return None
    return torch.cat([torch.arange(a, b) for a, b in out_slices]).to(device)


def take_rows(t: Tensor, out_slices: Optional[list[list[int]]], index: Optional[Tensor]) -> Tensor:
    """The adapted rows of ``t`` (d_out, ...): ``t`` itself, a view (one slice) or a gather."""
    if out_slices is None:
        return t
    if index is None:
        a, b = out_slices[0]
        return t[a:b]
    return t.index_select(0, index.to(t.device))


def overwrite_rows(y: Tensor, ya: Tensor, out_slices: list[list[int]], index: Optional[Tensor]) -> Tensor:
    """``y`` (..., d_out) with its adapted columns replaced by ``ya`` (..., n_a); every other
    column is ``y``'s, bit for bit."""
    ya = ya.to(y.dtype)
    if index is None:
        a, e = out_slices[0]
        return torch.cat([y[..., :a], ya, y[..., e:]], -1)
    return y.index_copy(y.dim() - 1, index.to(y.device), ya)
