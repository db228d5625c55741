"""``model.generate`` with one task per row: the per-sequence task names follow the batch
expansion that ``generate`` does for beam search and ``num_return_sequences``.

``generate`` repeats every row ``expand`` times (``repeat_interleave`` on the batch):
``num_beams`` rows for beam search (greedy or sampled), ``num_return_sequences`` rows without
beams. Beam search reorders its cache only among a row's own beams, so a name fixed per row
position stays right for the whole generation, KV cache included. The multi-task forward is
Share's (:func:`share_kernels.task_ids`); one task for the whole batch works for every method
with ``set_task`` and a plain ``generate``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..continual.wrap import task_ids


def expand_task_names(names: Sequence[str], num_beams: int = 1, num_return_sequences: int = 1) -> list[str]:
    """``names`` (one per input row) repeated as ``generate`` repeats the rows."""
    for arg, v in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    expand = num_beams if num_beams > 1 else num_return_sequences
    return [n for n in names for _ in range(expand)]


def generate_with_tasks(model: nn.Module, tasks: Sequence[str], input_ids: torch.Tensor, **generate_kwargs: Any):
    """``model.generate(input_ids, **generate_kwargs)`` with row i under task ``tasks[i]``
    (``"__base__"`` for the base model), inside ``torch.no_grad()``.

    ``num_beams`` and ``num_return_sequences`` are read from ``generate_kwargs`` (or the model's
    ``generation_config``) to expand the names as ``generate`` expands the rows. Each row's
    output equals generating that row alone with its task set (up to float rounding of the
    batched matmuls, which can flip an exact tie).
    """
    if isinstance(tasks, str) or len(tasks) != input_ids.shape[0]:
        got = repr(tasks) if isinstance(tasks, str) else f"{len(tasks)} names"
        raise ValueError(f"tasks: one task name per row of input_ids {tuple(input_ids.shape)}; got {got}")
    cfg = getattr(model, "generation_config", None)
    beams = generate_kwargs.get("num_beams", getattr(cfg, "num_beams", 1) or 1)
    returns = generate_kwargs.get("num_return_sequences", getattr(cfg, "num_return_sequences", 1) or 1)
    names = expand_task_names(list(tasks), beams, returns)
    with torch.no_grad(), task_ids(model, names):
        return model.generate(input_ids, **generate_kwargs)
