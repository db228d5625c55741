"""``InfLoRALinear``: a frozen ``nn.Linear`` plus one low-rank branch per task (InfLoRA).

Shapes: d_in = ``in_features``, d_out = ``out_features``, r = branch rank.

- Per task t a branch ``A_t B_t``: ``B_t`` (r, d_in) is designed before the task trains (by
  :mod:`share_kernels.continual.inflora`, from the task's inputs projected outside the gradient
  memory) and stays frozen; ``A_t`` (d_out, r) starts at zero and is the only thing trained.
- With task j active the forward is every branch up to j (class-incremental, no task id):
  ``y = x Wᵀ + b + Σ_{i ≤ j} x B_iᵀ A_iᵀ``, one ``lowrank_linear`` call with
  ``U = [B_1ᵀ … B_jᵀ]`` (d_in, r·j) and ``C = [A_1ᵀ; …; A_jᵀ]`` (r·j, d_out).
- :meth:`fold` merges the finished branches into a stored ``folded_delta = Σ A_i B_i``
  (d_out, d_in), so the forward then runs ``lowrank_linear(x, W + folded_delta, b, U, C)`` with
  only the unfolded branches in U, C. The branches' tensors are kept (a task still saves and
  loads as its own ``A``, ``B``), so an earlier task can still be selected exactly.
- The gradient memory (DualGPM) is stored here for save / load: ``memory`` (d_in, m), orthonormal
  columns, float32, and ``memory_retain``: False, the columns span the old tasks' input space
  (``remove`` mode); True, they span its orthogonal complement (``retain`` mode).
- ``merge="magnitude"`` (PS-LoRA's merge on top of InfLoRA): finished branches are combined
  into ``folded_delta`` by the caller's rule (:meth:`fold` with ``combine``, element-wise
  larger magnitude) instead of summed, and every finished task runs that one merged model.
- ``out_slices`` (fused projections, e.g. the k and v thirds of a ViT's ``qkv``): only these
  output rows (n_a of them) are adapted; ``A_t`` and ``folded_delta`` have n_a rows, and the
  other outputs are ``base_layer(x)``'s, bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.lowrank_linear import lowrank_linear
from ._cache import forward_cache
from .common import TaskLayer, base_rows, check_out_slices, check_task_name, expand_rows, overwrite_rows, slice_index, take_rows

#: the official code's scale of B_t's rows, 1/√3
DEFAULT_SCALE = 1.0 / math.sqrt(3.0)
#: how finished branches combine: summed (InfLoRA) or by PS-LoRA's magnitude merge
MERGES = ("sum", "magnitude")


class InfLoRALinear(TaskLayer):
    """``y = base_layer(x) + Σ_{i ≤ active} x B_iᵀ A_iᵀ``; B frozen, only the training task's A trains.

    The wrapped ``nn.Linear`` is kept as ``base_layer`` (same object, weight untouched, frozen).
    Adapter tensors take the base weight's dtype and device; the memory is float32.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 10,
        scale: float = DEFAULT_SCALE,
        merge: str = "sum",
        out_slices: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"InfLoRALinear: r must be a positive int; got {r!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"InfLoRALinear: scale must be a finite number > 0; got {scale!r}")
        if merge not in MERGES:
            raise ValueError(f"InfLoRALinear: merge must be one of {list(MERGES)}; got {merge!r}")
        self._init_base(base_layer, "InfLoRALinear")  # nn.Linear or transformers Conv1D
        self.r = r
        #: the norm of B_t's rows (B_t = scale · top-r singular directions, transposed)
        self.scale = float(scale)
        self.merge = merge
        #: adapted output rows as sorted [start, stop] pairs (None: all of them)
        self.out_slices = check_out_slices(out_slices, self.out_features)
        #: number of adapted output rows n_a (A_t is (n_a, r))
        self.adapted_out = (
            self.out_features if self.out_slices is None else sum(b - a for a, b in self.out_slices)
        )
        w = base_layer.weight
        # one slice is a view of the weight; several are gathered through these indices
        self.register_buffer("_out_index", slice_index(self.out_slices, w.device), persistent=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._tasks: list[str] = []
        self.active_task: Optional[str] = None
        #: the task whose A trains (the last one added, until :meth:`finish_task`)
        self.training_task: Optional[str] = None
        #: how many of the first tasks are merged into ``folded_delta``
        self.n_folded = 0
        self.register_buffer("folded_delta", None)
        # W + folded_delta, rebuilt whenever folded_delta changes: the forward reads it instead of
        # writing a d_out x d_in sum every call (and 16-bit weights round once, not twice).
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("memory", torch.zeros(self.in_features, 0, dtype=torch.float32, device=w.device))
        self.memory_retain = False

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 10,
        scale: float = DEFAULT_SCALE,
        merge: str = "sum",
        out_slices: Optional[Sequence[Sequence[int]]] = None,
    ) -> "InfLoRALinear":
        """Wrap ``linear`` without copying or changing its weight; no tasks, empty memory."""
        return cls(linear, r=r, scale=scale, merge=merge, out_slices=out_slices)

    def _rows(self, t: Tensor) -> Tensor:
        """The adapted output rows of ``t`` (d_out, ...) (a view for one slice)."""
        return take_rows(t, self.out_slices, self._out_index)

    # ----------------------------------------------------------------- tasks

    def add_task(self, name: str, B: Tensor) -> None:
        """Add task ``name`` with its designed ``B`` (r, d_in) and ``A = 0`` (n_a, r), so the
        output does not change; it becomes the training task (trainable once :meth:`set_task`
        selects it)."""
        self._check_new(name)
        if self.training_task is not None:
            raise ValueError(f"task {self.training_task!r} is still training; finish_task() it before adding {name!r}")
        if not isinstance(B, Tensor):
            raise TypeError(f"add_task: B must be a torch.Tensor; got {type(B).__name__}")
        if B.shape != (self.r, self.in_features):
            raise ValueError(f"add_task: B must be (r={self.r}, d_in={self.in_features}); got {tuple(B.shape)}")
        self.lora_B[name] = self._new_param(B)
        self.lora_A[name] = self._new_param(torch.zeros(self.adapted_out, self.r))
        self._tasks.append(name)
        self.training_task = name

    def finish_task(self) -> None:
        """Freeze the training task's ``A`` for good (its branch is now an old task's)."""
        self.training_task = None
        self.set_task(self.active_task)

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """``[A]`` of task ``name`` while it is the training task, else ``[]`` (old branches never
        train again: later tasks' B were designed assuming they stay fixed)."""
        self._check_known(name)
        return [self.lora_A[name]] if name == self.training_task else []

    def set_task(self, name: Optional[str]) -> None:
        """Use the branches of the tasks up to ``name`` (None: the base layer alone); the
        training task's A is trainable when it is the one selected."""
        if name is not None:
            self._check_known(name)
        self.active_task = name
        for p in self.lora_A.values():
            p.requires_grad_(False)
        if name is not None:
            for p in self.task_parameters(name):
                p.requires_grad_(True)

    # ----------------------------------------------------------------- memory

    def set_memory(self, basis: Tensor, retain: bool) -> None:
        """Store the gradient memory: ``basis`` (d_in, m) orthonormal columns; ``retain`` says
        whether they span the protected space (False) or its complement (True)."""
        if not isinstance(basis, Tensor) or basis.dim() != 2 or basis.shape[0] != self.in_features:
            got = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
            raise ValueError(f"set_memory: basis must be (d_in={self.in_features}, m); got {got}")
        if basis.shape[1] > self.in_features:
            raise ValueError(f"set_memory: basis has {basis.shape[1]} columns, more than d_in={self.in_features}")
        self.memory = basis.detach().to(device=self.base_layer.weight.device, dtype=torch.float32).clone()
        self.memory_retain = bool(retain)

    @property
    def memory_dim(self) -> int:
        """Dimension of the protected input space (the memory's span, or d_in minus the stored complement)."""
        m = self.memory.shape[1]
        return self.in_features - m if self.memory_retain else m

    # ----------------------------------------------------------------- math

    def delta_weight(self, name: Optional[str] = None) -> Tensor:
        """``Σ_{i ≤ name} A_i B_i`` (d_out, d_in) in float32 or wider (``name`` None: the active
        task); the forward is ``F.linear(x, W + delta, b)``. With ``merge="magnitude"`` the
        finished tasks enter as the merged ``folded_delta``; rows outside ``out_slices`` are 0."""
        name = self.active_task if name is None else name
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        if name is None:
            return torch.zeros(self.out_features, self.in_features, dtype=acc, device=w.device)
        self._check_known(name)
        j = self._tasks.index(name)
        rows = torch.zeros(self.adapted_out, self.in_features, dtype=acc, device=w.device)
        start = self.n_folded if self.merge == "magnitude" else 0
        if start:
            rows += self.folded_delta.to(acc)
        for t in self._tasks[start : j + 1]:
            rows += self.lora_A[t].to(acc) @ self.lora_B[t].to(acc)
        return expand_rows(rows, self.out_slices, self._out_index, self.out_features)

    def history(self) -> Tensor:
        """(n_a, d_in): the update of the finished tasks (everything but the training task), in
        the weight's dtype: their merged ``folded_delta``, or the sum of their branches."""
        done = [t for t in self._tasks if t != self.training_task]
        w = self.base_layer.weight
        if self.n_folded == len(done):
            if self.folded_delta is not None:
                return self.folded_delta
            return w.new_zeros(self.adapted_out, self.in_features)
        if self.merge == "magnitude":
            raise ValueError(f"history: {len(done) - self.n_folded} finished task(s) are not merged yet; fold() them")
        return self._rows(self.delta_weight(done[-1])).to(w.dtype)

    def stability_loss(self, alpha: float) -> Tensor:
        """PS-LoRA's ``stability_loss(B_t, A_t, history(), alpha)`` of the training task: the
        update ``D = A_t B_t`` against the earlier tasks' (0-dim fp32; 0 without a training task).
        Its gradient reaches ``A_t`` (``B_t`` is frozen)."""
        from ..ops.stability_loss import stability_loss

        if self.training_task is None:
            return torch.zeros((), device=self.base_layer.weight.device, dtype=torch.float32)
        t = self.training_task
        return stability_loss(self.lora_B[t], self.lora_A[t], self.history(), alpha)

    def fold(self, combine: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> int:
        """Merge every finished, unfolded branch into ``folded_delta``; returns how many were
        folded. ``combine(delta, A_i B_i)`` returns the new delta (default: their sum; required
        with ``merge="magnitude"``). Computed in float32 (or the weight's dtype if wider),
        stored in the weight's dtype."""
        if combine is None and self.merge != "sum":
            raise ValueError(f"fold: merge={self.merge!r} needs the combine rule (the method passes it)")
        done = [t for t in self._tasks if t != self.training_task]
        new = done[self.n_folded :]
        if not new:
            return 0
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = torch.zeros(self.adapted_out, self.in_features, dtype=acc, device=w.device)
        if self.folded_delta is not None:
            delta += self.folded_delta.to(acc)
        with torch.no_grad():
            for t in new:
                update = self.lora_A[t].to(acc) @ self.lora_B[t].to(acc)
                delta = delta + update if combine is None else combine(delta, update)
        self._set_folded(delta)
        self.n_folded = len(done)
        return len(new)

    def _set_folded(self, delta: Optional[Tensor]) -> None:
        """Install ``folded_delta`` (stored in the weight's dtype) and the merged weight copy."""
        w = self.base_weight()
        if delta is None:
            self.folded_delta = self.folded_weight = None
            return
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = delta.detach().to(device=w.device)
        self.folded_delta = delta.to(w.dtype).clone()
        self.folded_weight = (self._rows(w.detach()).to(acc) + delta.to(acc)).to(w.dtype)

    def _operands(self, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """(weight, U, C) of the forward with tasks 0..j (weight: the adapted rows): folded tasks
        enter through the weight when all of them are included (always, for the magnitude
        merge: every finished task runs the merged model), the rest as branches."""
        start = self.n_folded if self.n_folded and (self.merge == "magnitude" or j >= self.n_folded - 1) else 0
        w = self.folded_weight if start else base_rows(self)
        names = self._tasks[start : j + 1]
        if not names:
            return w, w.new_zeros(self.in_features, 0), w.new_zeros(0, self.adapted_out)

        def concat() -> tuple[Tensor, Tensor]:
            U = torch.cat([self.lora_B[t] for t in names], 0).t()
            C = torch.cat([self.lora_A[t].t() for t in names], 0)
            return U, C

        # the concatenation is cached while nothing trains (:mod:`share_kernels.nn._cache`)
        sources = [self.lora_B[t] for t in names] + [self.lora_A[t] for t in names]
        return (w, *forward_cache(self).get("branches", sources, tuple(names), concat))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d_in) -> (..., d_out): one ``lowrank_linear`` call over the selected branches."""
        if self.active_task is None:
            return self.base_layer(x)
        w, U, C = self._operands(self._tasks.index(self.active_task))
        b = self.base_layer.bias
        if self.out_slices is not None and b is not None:
            b = self._rows(b)
        if U.shape[1] == 0:  # every selected branch is folded into w: no low-rank pass at all
            ya = F.linear(x, w, b)
        else:
            ya = lowrank_linear(x, w, b, U, C)
        if self.out_slices is None:
            return ya
        return overwrite_rows(self.base_layer(x), ya, self.out_slices, self._out_index)

    # ----------------------------------------------------------------- save / load

    def adapter_config(self) -> dict:
        """JSON-able keyword arguments that rebuild this layer with :meth:`from_linear`."""
        out = {"r": self.r, "scale": self.scale}
        if self.merge != "sum":
            out["merge"] = self.merge
        if self.out_slices is not None:
            out["out_slices"] = [list(sl) for sl in self.out_slices]
        return out

    def _check_saveable(self) -> None:
        if self.training_task is not None:
            raise ValueError(f"task {self.training_task!r} is still training; end it before saving")

    def shared_tensors(self) -> dict[str, Tensor]:
        """``memory`` (d_in, m) float32, ``memory_retain`` and ``n_folded`` (1,) int64, and
        ``folded_delta`` (n_a, d_in) when branches are folded."""
        self._check_saveable()
        dev = self.memory.device
        out = {
            "memory": self.memory,
            "memory_retain": torch.tensor([int(self.memory_retain)], dtype=torch.int64, device=dev),
            "n_folded": torch.tensor([self.n_folded], dtype=torch.int64, device=dev),
        }
        if self.folded_delta is not None:
            out["folded_delta"] = self.folded_delta
        return out

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s branch: ``{"A": (n_a, r), "B": (r, d_in)}``."""
        self._check_known(name)
        self._check_saveable()
        return {"A": self.lora_A[name].detach(), "B": self.lora_B[name].detach()}

    def load_adapter_state(self, shared: dict[str, Tensor], tasks: dict[str, dict[str, Tensor]]) -> None:
        """Replace memory, folded delta and tasks (in ``tasks``' order) by saved tensors;
        ValueError naming the tensor and the expected and found shapes when they do not fit."""
        base = {"memory", "memory_retain", "n_folded"}
        if not base <= set(shared) <= base | {"folded_delta"}:
            raise ValueError(
                f"shared tensors must be {sorted(base)} and optionally 'folded_delta'; got {sorted(shared)}"
            )
        mem = shared["memory"]
        if mem.dim() != 2 or mem.shape[0] != self.in_features or mem.shape[1] > self.in_features:
            raise ValueError(
                f"memory: expected (d_in={self.in_features}, m) with m <= {self.in_features}; got {tuple(mem.shape)}"
            )
        for n in ("memory_retain", "n_folded"):
            if shared[n].shape != (1,):
                raise ValueError(f"{n}: expected shape (1,); got {tuple(shared[n].shape)}")
        retain, n_folded = int(shared["memory_retain"][0]), int(shared["n_folded"][0])
        if retain not in (0, 1) or not 0 <= n_folded <= len(tasks):
            raise ValueError(
                f"memory_retain must be 0 or 1 and n_folded in [0, {len(tasks)}]; got {retain}, {n_folded}"
            )
        delta = shared.get("folded_delta")
        if (delta is None) != (n_folded == 0):
            raise ValueError(f"folded_delta must be present exactly when n_folded > 0; n_folded is {n_folded}")
        if delta is not None and delta.shape != (self.adapted_out, self.in_features):
            raise ValueError(
                f"folded_delta: expected ({'d_out' if self.out_slices is None else 'n_a'}={self.adapted_out}, d_in={self.in_features}); got {tuple(delta.shape)}"
            )
        expected = {"A": (self.adapted_out, self.r), "B": (self.r, self.in_features)}
        for t, tensors in tasks.items():
            check_task_name(t)
            if set(tensors) != set(expected):
                raise ValueError(f"task {t!r}: tensors must be exactly ['A', 'B']; got {sorted(tensors)}")
            for n, v in tensors.items():
                if tuple(v.shape) != expected[n]:
                    raise ValueError(f"task {t!r}: {n}: expected {expected[n]}; got {tuple(v.shape)}")
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t, tensors in tasks.items():
            self.lora_A[t] = self._new_param(tensors["A"])
            self.lora_B[t] = self._new_param(tensors["B"])
        self._tasks = list(tasks)
        self.active_task = self.training_task = None
        self.n_folded = n_folded
        self._set_folded(delta)
        self.set_memory(mem, bool(retain))

    def extra_repr(self) -> str:
        mode = "retain" if self.memory_retain else "remove"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale:.4g}, "
            f"tasks={len(self._tasks)}, folded={self.n_folded}, memory={self.memory_dim}/{self.in_features} ({mode})"
            + (f", merge={self.merge}" if self.merge != "sum" else "")
            + (f", out_slices={self.out_slices}" if self.out_slices is not None else "")
        )
