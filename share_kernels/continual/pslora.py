"""PS-LoRA (Zhou, Wu, Wei; arXiv 2512.08960): stability-regularised LoRA per task, magnitude merge.

Per layer (:class:`~share_kernels.nn.PSLoRALinear`), with the history ``P = prev_delta``
(d_out, d_in) of all finished tasks and the training task's ``D = scale · B A``:

1. Training: the user adds ``learner.extra_loss() = lam · Σ_layers stability_loss(A, scale·B, P, alpha)``
   to the task loss, where ``stability_loss = Σ (1 − tanh(αD) ⊙ tanh(αP)) ⊙ D²``.
2. ``end_task``: ``P ← magnitude_merge(P, D)``, element-wise the entry of larger |.|.

Both are reconstructions of the paper's equations, with these choices:

- Loss: one term for the paper's two regularisers (direction and magnitude). ``tanh(αD)
  tanh(αP)`` is a smooth sign agreement in [−1, 1] (α, the sharpness, sets the scale below which
  an entry counts as "no sign"), so an entry that opposes the history costs up to ``2 D²``, an
  agreeing one costs ~0 and one where the history is ~0 costs ``D²`` (magnitude decay; on the
  first task, where ``P = 0``, the loss is plain L2 on the update). The loss is on the update
  itself (``scale`` applied to B), on the same scale as P. λ (``lam``) weighs it.
- Merge: no sign election (unlike TIES): per entry keep the history's value unless the new
  task's is strictly larger in magnitude; on a tie the history stays (so a zero update never
  overwrites, and ``+x`` against ``−x`` keeps the history's sign). Computed in fp32, stored in
  the weight's dtype.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from ..nn.pslora_linear import PSLoRALinear
from .method import Method, ParamCounts, check_target_slices, register_method

#: Rows of the update formed at a time by the merge (bounds its temporaries).
_MERGE_CHUNK_ELEMENTS = 1 << 20


@dataclass
class PSLoRAConfig:
    """PS-LoRA's options.

    Args:
        r: LoRA rank of each task (also the rank ``adapter_stats`` compares with).
        lora_alpha: peft's LoRA alpha; the update is ``scale · B A`` with ``scale = lora_alpha / r``.
        alpha: tanh sharpness of the stability loss's sign test (>= 0; 0 makes it plain L2).
        lam: weight λ of the stability loss in ``extra_loss`` (>= 0; 0 turns it off).
        target_slices: ``{name suffix: [[start, stop], ...]}``: adapt only these output rows of
            the matching layers (fused projections); the other rows stay the base layer's.
    """

    r: int = 8
    lora_alpha: float = 8.0
    alpha: float = 100.0
    lam: float = 0.1
    target_slices: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"PSLoRAConfig.r must be an int >= 1; got {self.r!r}")
        for name, strict in (("lora_alpha", True), ("alpha", False), ("lam", False)):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            if bad or v < 0 or (strict and v == 0):
                raise ValueError(f"PSLoRAConfig.{name} must be a finite number {'>' if strict else '>='} 0; got {v!r}")
            setattr(self, name, float(v))
        self.target_slices = check_target_slices(self.target_slices, "PSLoRAConfig.target_slices")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r


@dataclass
class StabilityConfig:
    """PS-LoRA's regularisers as a plug-in for another method's trained factors (InfLoRA's
    ``A_t``: ``wrap(model, "inflora", stability=StabilityConfig(...))`` or ``stability={...}``).

    Args:
        lam: weight λ of ``stability_loss`` (the task's update against the accumulated update
            of the earlier tasks) in ``extra_loss`` (>= 0; 0 turns the loss off).
        alpha: tanh sharpness of its sign test (>= 0).
        merge: True: finished tasks are combined by :func:`magnitude_merge` (every finished task
            then runs one merged model); False: the host method's own combination (InfLoRA: sum).
    """

    lam: float = 0.1
    alpha: float = 100.0
    merge: bool = True

    def __post_init__(self):
        for name in ("lam", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"StabilityConfig.{name} must be a finite number >= 0; got {v!r}")
            setattr(self, name, float(v))
        if not isinstance(self.merge, bool):
            raise ValueError(f"StabilityConfig.merge must be a bool; got {self.merge!r}")

    @classmethod
    def coerce(cls, value, where: str) -> Optional["StabilityConfig"]:
        """None / False -> None; True -> defaults; a dict or a StabilityConfig -> a StabilityConfig."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"{where}: unknown stability option(s) {unknown}; valid options are {sorted(names)}")
            return cls(**value)
        raise TypeError(f"{where} must be None, a bool, a dict or a StabilityConfig; got {type(value).__name__}")


@dataclass
class MergeReport:
    """What a merge did: per layer, the fraction of entries where the new task's update won."""

    after: str
    replaced: dict[str, float]

    def __str__(self) -> str:
        vals = list(self.replaced.values())
        mean = sum(vals) / len(vals) if vals else 0.0
        return f"magnitude merge after {self.after!r}: {mean:.3%} of entries taken from the new task (mean over layers)"


@torch.no_grad()
def magnitude_merge(prev_delta: Tensor, delta: Tensor) -> Tensor:
    """Element-wise ``delta`` where ``|delta| > |prev_delta|``, else ``prev_delta`` (ties keep the
    history); same shape, a new tensor in ``prev_delta``'s dtype. No sign election."""
    if prev_delta.shape != delta.shape:
        raise ValueError(
            f"magnitude_merge: prev_delta and delta must have one shape; got {tuple(prev_delta.shape)} and "
            f"{tuple(delta.shape)}"
        )
    return torch.where(delta.abs() > prev_delta.abs(), delta.to(prev_delta.dtype), prev_delta)


@torch.no_grad()
def merge_layer(layer: PSLoRALinear) -> float:
    """Merge the training task of ``layer`` into its history; returns the fraction of entries
    taken from the task. The update ``scale · B A`` is formed in fp32 (fp64 for fp64 layers), a block
    of rows at a time, and merged by :func:`magnitude_merge`."""
    name = layer.training_task
    if name is None:
        raise ValueError("merge_layer: the layer has no task in training")
    P = layer.prev_delta
    acc = torch.float64 if P.dtype == torch.float64 else torch.float32
    A = layer.lora_A[name].to(acc)
    B = layer.lora_B[name].to(acc) * layer.scale
    out = torch.empty_like(P)
    rows = max(1, _MERGE_CHUNK_ELEMENTS // max(layer.in_features, 1))
    taken = 0
    for i in range(0, P.shape[0], rows):
        p = P[i : i + rows].to(acc)
        merged = magnitude_merge(p, B[i : i + rows] @ A)
        taken += int((merged != p).sum())  # an entry changes exactly where the task won
        out[i : i + rows] = merged
    layer.finish_task(out)
    return taken / max(P.numel(), 1)


@register_method
class PSLoRAMethod(Method):
    """PS-LoRA behind :class:`~share_kernels.continual.ContinualLearner` (``method="pslora"``).

    ``begin_task``: a fresh LoRA per layer. ``extra_loss``: ``lam · Σ_layers stability_loss``
    (add it to the task loss). ``end_task``: magnitude merge into the history, returning a
    :class:`MergeReport`. Every finished task runs the same merged model.
    """

    name = "pslora"
    layer_cls = PSLoRALinear
    config_cls = PSLoRAConfig

    def __init__(self, layers: dict[str, PSLoRALinear], config: PSLoRAConfig):
        super().__init__(layers, config)
        self.check_layers_match({"r": "requested_r", "lora_alpha": "lora_alpha"})
        self.check_slices_match()
        for layer in layers.values():
            # Loss hyperparameters change no stored tensor: the config's win.
            layer.alpha, layer.lam = config.alpha, config.lam

    @classmethod
    def layer_kwargs(cls, config: PSLoRAConfig) -> dict:
        return {"r": config.r, "lora_alpha": config.lora_alpha, "alpha": config.alpha, "lam": config.lam}

    @classmethod
    def param_counts(
        cls, d_in: int, d_out: int, config: PSLoRAConfig, layer: Optional[PSLoRALinear] = None
    ) -> ParamCounts:
        """Per task ``r (d_in + d_out)`` trained and stored (the task's factors); shared: the
        merged history, ``d_in · d_out``."""
        if layer is not None:
            d_out = layer.adapted_out  # the adapted rows of a sliced layer
        r = layer.r if layer is not None else min(config.r, d_in, d_out)
        return ParamCounts(r * (d_in + d_out), r * (d_in + d_out), d_in * d_out)

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        for layer in self.layers.values():
            layer.add_task(name)
            layer.set_task(name)

    def extra_loss(self) -> Tensor:
        """``lam · Σ_layers stability_loss(A, scale · B, prev_delta, alpha)``, 0-dim fp32 (0 when
        no task is training or lam = 0)."""
        first = next(iter(self.layers.values()))
        total = torch.zeros((), device=first.prev_delta.device, dtype=torch.float32)
        if self.config.lam == 0.0:
            return total
        for layer in self.layers.values():
            total = total + layer.stability_loss().to(total.device, torch.float32)
        return self.config.lam * total

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> MergeReport:
        return MergeReport(after=name, replaced={n: merge_layer(layer) for n, layer in self.layers.items()})


__all__ = ["MergeReport", "PSLoRAConfig", "PSLoRAMethod", "StabilityConfig", "magnitude_merge", "merge_layer"]
