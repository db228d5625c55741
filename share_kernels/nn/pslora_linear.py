"""``PSLoRALinear``: a frozen ``nn.Linear``, the merged history of past tasks, one LoRA in training.

Shapes: d_in = ``in_features``, d_out = ``out_features``, r = LoRA rank.

- ``prev_delta`` (d_out, d_in), buffer: every finished task's update, magnitude-merged
  (:func:`share_kernels.continual.pslora.magnitude_merge`); zero before the first merge.
- The task in training: ``lora_A[t]`` (r, d_in), ``lora_B[t]`` (d_out, r), peft's initialisation
  (A Kaiming-uniform, B = 0, so a new task starts as an exact no-op), update
  ``scale · B A`` with ``scale = lora_alpha / r``.
- Forward: ``x (W + prev_delta)ᵀ + b + scale · x Aᵀ Bᵀ``, one ``lowrank_linear`` call
  (``U = Aᵀ``, ``C = scale · Bᵀ``) on a merged weight copy ``W + prev_delta``.

Why a merged copy and not ``W + prev_delta`` per call: the dense add writes a d_out x d_in
temporary on every forward (and autograd keeps it for the backward), so a memory-bound decode
or small-batch step reads three d x d matrices instead of one; on CPU at d = 1024 it made a
batch-8 forward several times slower (see the README section). The copy costs one more
d_out x d_in tensor, rebuilt only when the history changes (merge, load); ``base_layer.weight``
is never modified, as peft does.

``out_slices`` (fused projections): only these output rows (n_a of them) are adapted;
``prev_delta``, ``lora_B`` and the merged copy have n_a rows, and every other output is
``base_layer(x)``'s, bit for bit.

PS-LoRA serves one model for all tasks: any finished task runs ``W + prev_delta``; the
training task adds its LoRA; ``set_task(None)`` is the base layer. Finished tasks keep their
factors (frozen) as their saved record.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.lowrank_linear import lowrank_linear
from ..ops.stability_loss import stability_loss
from ._cache import forward_cache
from .common import TaskLayer, base_rows, check_out_slices, check_task_name, expand_rows, overwrite_rows, slice_index, take_rows


def _number(name: str, v, lo: float, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (strict and v == lo):
        raise ValueError(f"PSLoRALinear: {name} must be a finite number {'>' if strict else '>='} {lo}; got {v!r}")
    return float(v)


class PSLoRALinear(TaskLayer):
    """``y = x (W + prev_delta)ᵀ + b + scale · (x Aᵀ) Bᵀ`` with the training task's A, B.

    Args:
        base_layer: the ``nn.Linear`` to wrap (kept as ``base_layer``, weight untouched, frozen).
        r: LoRA rank (capped at min(d_in, d_out)).
        lora_alpha: peft's LoRA alpha; ``scale = lora_alpha / r``.
        alpha: sharpness of the tanh sign test in the stability loss (>= 0).
        lam: weight of the stability loss in :meth:`extra_loss` (>= 0).
        out_slices: sorted, disjoint ``[start, stop]`` output row ranges to adapt (None: all).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8.0,
        alpha: float = 100.0,
        lam: float = 0.1,
        out_slices: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"PSLoRALinear: r must be a positive int; got {r!r}")
        lora_alpha = _number("lora_alpha", lora_alpha, 0.0, strict=True)
        self._init_base(base_layer, "PSLoRALinear")  # nn.Linear or transformers Conv1D
        self.out_slices = check_out_slices(out_slices, self.out_features, "PSLoRALinear")
        #: number of adapted output rows n_a
        self.adapted_out = (
            self.out_features if self.out_slices is None else sum(b - a for a, b in self.out_slices)
        )
        self.register_buffer("_out_index", slice_index(self.out_slices, base_layer.weight.device), persistent=False)
        self.requested_r = r
        self.r = min(r, self.in_features, self.adapted_out)
        self.lora_alpha = lora_alpha
        self.scale = lora_alpha / r
        self.alpha = _number("alpha", alpha, 0.0)
        self.lam = _number("lam", lam, 0.0)
        w = base_layer.weight
        self.register_buffer("prev_delta", torch.zeros_like(self._rows(self.base_weight()), requires_grad=False))
        # W + prev_delta; None while the history is zero (the forward then uses W itself).
        self.register_buffer("merged_weight", None, persistent=False)
        # load_state_dict copies into prev_delta in place: rebuild the copy from it afterwards.
        self.register_load_state_dict_post_hook(lambda module, _keys: module.set_history(module.prev_delta))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._tasks: list[str] = []
        self.active_task: Optional[str] = None
        #: the task whose LoRA is not merged yet, if any
        self.training_task: Optional[str] = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8.0,
        alpha: float = 100.0,
        lam: float = 0.1,
        out_slices: Optional[Sequence[Sequence[int]]] = None,
    ) -> "PSLoRALinear":
        """Wrap ``linear`` without copying or changing its weight; empty history."""
        return cls(linear, r=r, lora_alpha=lora_alpha, alpha=alpha, lam=lam, out_slices=out_slices)

    def _rows(self, t: Tensor) -> Tensor:
        """The adapted output rows of ``t`` (d_out, ...) (a view for one slice)."""
        return take_rows(t, self.out_slices, self._out_index)

    # ----------------------------------------------------------------- tasks

    def add_task(self, name: str) -> None:
        """Add task ``name`` with a fresh LoRA (A Kaiming-uniform, B = 0); frozen until :meth:`set_task`."""
        self._check_new(name)
        if self.training_task is not None:
            raise ValueError(f"task {self.training_task!r} is not merged yet; end it before adding {name!r}")
        a = torch.empty(self.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's lora_A init
        self.lora_A[name] = self._new_param(a)
        self.lora_B[name] = self._new_param(torch.zeros(self.adapted_out, self.r))
        self._tasks.append(name)
        self.training_task = name

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """``[lora_A[name], lora_B[name]]`` while ``name`` trains; [] once it is merged."""
        self._check_known(name)
        return [self.lora_A[name], self.lora_B[name]] if name == self.training_task else []

    def set_task(self, name: Optional[str]) -> None:
        """The forward's task: the training task (history + its LoRA), a finished task (the
        merged model, the same for all of them) or None (the base layer). Only the training
        task's factors become trainable, and only when it is the one set."""
        if name is not None:
            self._check_known(name)
        self.active_task = name
        for p in [*self.lora_A.values(), *self.lora_B.values()]:
            p.requires_grad_(False)
        if name is not None:
            for p in self.task_parameters(name):
                p.requires_grad_(True)

    # ----------------------------------------------------------------- math

    def delta_weight(self, name: Optional[str] = None) -> Tensor:
        """``scale · B A`` (d_out, d_in) of task ``name`` (default: the training task), in the
        weight's dtype, computed in fp32 (fp64 for fp64 layers); rows outside ``out_slices`` are 0."""
        name = self.training_task if name is None else name
        if name is None:
            raise ValueError("delta_weight: no task in training; name a task")
        self._check_known(name)
        A, B = self.lora_A[name], self.lora_B[name]
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        d = (self.scale * (B.to(acc) @ A.to(acc))).to(A.dtype)
        return expand_rows(d, self.out_slices, self._out_index, self.out_features)

    def stability_loss(self) -> Tensor:
        """``stability_loss(A, scale · B, prev_delta, alpha)`` of the training task (0-dim fp32).

        The scale goes on B, so the loss sees the update the forward adds, ``D = scale · B A``,
        on the same scale as ``prev_delta``; its gradient reaches B through the scale. Zero
        without a training task.
        """
        if self.training_task is None:
            return torch.zeros((), device=self.prev_delta.device, dtype=torch.float32)
        A, B = self.lora_A[self.training_task], self.lora_B[self.training_task]
        return stability_loss(A, B * self.scale, self.prev_delta, self.alpha)

    def extra_loss(self) -> Tensor:
        """``lam · stability_loss()``: add it to the task loss."""
        return self.lam * self.stability_loss()

    def set_history(self, prev_delta: Tensor) -> None:
        """Install ``prev_delta`` (n_a, d_in) and rebuild the merged weight copy."""
        if prev_delta.shape != self.prev_delta.shape:
            raise ValueError(
                f"prev_delta: expected ({'d_out' if self.out_slices is None else 'n_a'}={self.adapted_out}, d_in={self.in_features}); "
                f"got {tuple(prev_delta.shape)}"
            )
        w = self.base_weight()
        self.prev_delta = prev_delta.detach().to(device=w.device, dtype=w.dtype).contiguous()
        if not bool(self.prev_delta.any()):
            self.merged_weight = None
        else:
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # one rounding for 16-bit
            self.merged_weight = (self._rows(w.detach()).to(acc) + self.prev_delta.to(acc)).to(w.dtype)

    def finish_task(self, merged_history: Tensor) -> None:
        """End the training task: ``merged_history`` becomes ``prev_delta``, its factors freeze."""
        if self.training_task is None:
            raise ValueError("finish_task: no task in training")
        self.set_history(merged_history)
        self.training_task = None
        self.set_task(self.active_task)

    def _weight(self) -> Tensor:
        """``W + prev_delta`` over the adapted rows."""
        return self.merged_weight if self.merged_weight is not None else base_rows(self)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., d_out)."""
        if self.active_task is None:
            return self.base_layer(x)
        w, b = self._weight(), self.base_layer.bias
        if b is not None:
            b = self._rows(b)
        if self.active_task != self.training_task:
            y = F.linear(x, w, b)
        else:
            A, B = self.lora_A[self.active_task], self.lora_B[self.active_task]
            # scale · Bᵀ is cached while nothing trains (:mod:`share_kernels.nn._cache`)
            C = forward_cache(self).get("C", (B,), self.scale, lambda: B.t() * self.scale)
            y = lowrank_linear(x, w, b, A.t(), C)
        if self.out_slices is None:
            return y
        return overwrite_rows(self.base_layer(x), y, self.out_slices, self._out_index)

    # ----------------------------------------------------------------- save / load

    def adapter_config(self) -> dict:
        """JSON-able keyword arguments that rebuild this layer with :meth:`from_linear`."""
        out = {"r": self.requested_r, "lora_alpha": self.lora_alpha, "alpha": self.alpha, "lam": self.lam}
        if self.out_slices is not None:
            out["out_slices"] = [list(sl) for sl in self.out_slices]
        return out

    def _check_saveable(self) -> None:
        if self.training_task is not None:
            raise ValueError(f"task {self.training_task!r} is not merged yet; end it before saving")

    def shared_tensors(self) -> dict[str, Tensor]:
        """The merged history every task uses: ``{"prev_delta": (n_a, d_in)}``."""
        self._check_saveable()
        return {"prev_delta": self.prev_delta}

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s trained factors: ``{"lora_A": (r, d_in), "lora_B": (n_a, r)}``."""
        self._check_known(name)
        self._check_saveable()
        return {"lora_A": self.lora_A[name].detach(), "lora_B": self.lora_B[name].detach()}

    def load_adapter_state(self, shared: dict[str, Tensor], tasks: dict[str, dict[str, Tensor]]) -> None:
        """Replace history and tasks (in ``tasks``' order) by saved tensors; ValueError naming the
        tensor and the expected and found shapes when they do not fit. Every task counts as merged."""
        if set(shared) != {"prev_delta"}:
            raise ValueError(f"shared tensors must be exactly ['prev_delta']; got {sorted(shared)}")
        expect = {"lora_A": (self.r, self.in_features), "lora_B": (self.adapted_out, self.r)}
        for t, tensors in tasks.items():
            check_task_name(t)
            if set(tensors) != set(expect):
                raise ValueError(f"task {t!r}: tensors must be exactly {sorted(expect)}; got {sorted(tensors)}")
            for n, v in tensors.items():
                if tuple(v.shape) != expect[n]:
                    raise ValueError(f"task {t!r}: {n}: expected {expect[n]}; got {tuple(v.shape)}")
        self.set_history(shared["prev_delta"])
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t, tensors in tasks.items():
            self.lora_A[t] = self._new_param(tensors["lora_A"].detach().clone())
            self.lora_B[t] = self._new_param(tensors["lora_B"].detach().clone())
        self._tasks = list(tasks)
        self.active_task = self.training_task = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale}, "
            f"alpha={self.alpha}, lam={self.lam}, tasks={len(self._tasks)}"
            + (f", out_slices={self.out_slices}" if self.out_slices is not None else "")
        )
