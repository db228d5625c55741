"""Parameter and storage accounting of adapters against per-task LoRA on the same layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch.nn as nn

from .method import Method
from .wrap import model_method


@dataclass(frozen=True)
class AdapterStats:
    """Counts summed over the adapted layers; LoRA of rank r trains and stores
    ``r (d_in + d_out)`` parameters per layer and task.

    ``trainable_per_task``: what an optimizer updates while one task trains;
    ``stored_per_task``: what each task adds on disk; ``shared``: stored once for all tasks.
    """

    method: str
    layers: int
    tasks: int
    lora_rank: int
    bytes_per_param: int
    trainable_per_task: int
    stored_per_task: int
    shared: int
    lora_per_task: int

    @classmethod
    def from_shapes(
        cls,
        method: type[Method],
        shapes: Sequence[tuple[int, int]],
        config: Any,
        lora_rank: int,
        bytes_per_param: int = 4,
        tasks: int = 0,
        layers: Optional[Sequence[nn.Module]] = None,
    ) -> "AdapterStats":
        """From layer shapes ``[(d_in, d_out), ...]`` alone (``layers``, when given, supply their
        actual k and p)."""
        counts = [
            method.param_counts(d_in, d_out, config, None if layers is None else layers[i])
            for i, (d_in, d_out) in enumerate(shapes)
        ]
        return cls(
            method=method.name,
            layers=len(shapes),
            tasks=tasks,
            lora_rank=lora_rank,
            bytes_per_param=bytes_per_param,
            trainable_per_task=sum(c.trainable_per_task for c in counts),
            stored_per_task=sum(c.stored_per_task for c in counts),
            shared=sum(c.shared for c in counts),
            lora_per_task=sum(lora_rank * (d_in + d_out) for d_in, d_out in shapes),
        )

    @property
    def trainable_ratio(self) -> float:
        """LoRA's trainable parameters per task over the method's."""
        return self.lora_per_task / self.trainable_per_task

    @property
    def stored_ratio(self) -> float:
        """LoRA's stored parameters per task over the method's (the shared part left out)."""
        return self.lora_per_task / self.stored_per_task

    def total_bytes(self, n_tasks: int) -> int:
        """Stored bytes for ``n_tasks`` tasks: shared part plus every task's part."""
        return (self.shared + n_tasks * self.stored_per_task) * self.bytes_per_param

    def lora_total_bytes(self, n_tasks: int) -> int:
        return n_tasks * self.lora_per_task * self.bytes_per_param

    def rows(self, n_tasks: Sequence[int] = (10, 100, 500)) -> list[dict]:
        """One dict per task count: per-task and total sizes of both, and the ratios."""
        b = self.bytes_per_param
        return [
            {
                "tasks": n,
                f"{self.method}_trainable_per_task": self.trainable_per_task,
                "lora_trainable_per_task": self.lora_per_task,
                "trainable_ratio": self.trainable_ratio,
                f"{self.method}_kb_per_task": self.stored_per_task * b / 1e3,
                "lora_kb_per_task": self.lora_per_task * b / 1e3,
                f"{self.method}_total_mb": self.total_bytes(n) / 1e6,
                "lora_total_mb": self.lora_total_bytes(n) / 1e6,
                "total_ratio": self.lora_total_bytes(n) / self.total_bytes(n),
            }
            for n in n_tasks
        ]

    def __str__(self) -> str:
        b, r = self.bytes_per_param, self.lora_rank
        n = max(self.tasks, 1)
        return "\n".join(
            [
                f"{self.method}: {self.layers} layers, {self.tasks} tasks, {b} bytes per parameter; vs LoRA r={r}",
                f"  trainable per task: {self.trainable_per_task:,} "
                f"(LoRA {self.lora_per_task:,}, {self.trainable_ratio:.1f}x)",
                f"  stored per task:    {self.stored_per_task * b:,} B "
                f"(LoRA {self.lora_per_task * b:,} B, {self.stored_ratio:.1f}x)",
                f"  shared:             {self.shared * b:,} B",
                f"  total for {n} task(s): {self.total_bytes(n):,} B (LoRA {self.lora_total_bytes(n):,} B, "
                f"{self.lora_total_bytes(n) / self.total_bytes(n):.2f}x)",
            ]
        )


def adapter_stats(model: nn.Module, lora_rank: Optional[int] = None) -> AdapterStats:
    """:class:`AdapterStats` of a wrapped model; ``lora_rank`` defaults to the config's ``r``.
    Bytes per parameter are those of the adapter tensors' dtype."""
    method, config, layers = model_method(model)
    first = next(iter(layers.values()))
    return AdapterStats.from_shapes(
        method,
        [(m.in_features, m.out_features) for m in layers.values()],
        config,
        lora_rank=lora_rank if lora_rank is not None else config.r,
        bytes_per_param=first.base_layer.weight.element_size(),
        tasks=len(first.tasks),
        layers=list(layers.values()),
    )
