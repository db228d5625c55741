"""Helpers shared by the adapter layers."""
from __future__ import annotations

import re

import torch.nn as nn

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
# Task names key nn.ParameterDicts, which cannot hold a key that shadows one of their methods.
_RESERVED = frozenset(n for n in dir(nn.ParameterDict) if not n.startswith("_"))


def check_task_name(name: str) -> None:
    """Task names key parameters and name files: letters, digits, ``_`` and ``-`` (not first)."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ValueError(f"invalid task name {name!r}: use letters, digits, '_' and '-' (not as the first character)")
    if name in _RESERVED:
        raise ValueError(f"invalid task name {name!r}: it is reserved (a method of nn.ParameterDict)")
