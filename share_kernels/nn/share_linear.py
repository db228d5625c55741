"""``ShareLinear``: a frozen ``nn.Linear`` plus one shared low-rank subspace for many tasks.

Shapes: d_in = ``in_features``, d_out = ``out_features``, k = subspace size, p = pseudo-rank.

- Shared bases ``U`` (d_in, k) and ``V`` (d_out, k), orthonormal columns, frozen buffers.
- Per task ``eps_a[t]``, ``eps_b[t]`` (k, p):  ``dW_t = scale * V eps_b eps_aᵀ Uᵀ`` (d_out, d_in).
- Forward with one active task: ``lowrank_linear(x, W, b, U, C)``, ``C = scale * (eps_a eps_bᵀ) Vᵀ``.
- Forward with ``task_ids``: ``multi_task_linear(x, W, b, U, cores, V, task_ids)`` with
  ``cores[t] = scale * eps_a[t] eps_b[t]ᵀ`` (inference only).

The task in training may carry extras that the continual procedure
(:mod:`share_kernels.continual.share`) folds back into the subspace when the task ends:

- temporary directions (:meth:`ShareLinear.expand`): ``U_tmp`` (d_in, φ), ``V_tmp`` (d_out, φ) and
  coefficients ``eps_a_tmp``, ``eps_b_tmp`` (φ, p), all trainable. The effective factors are
  ``A = [U, U_tmp] [eps_a; eps_a_tmp]`` (d_in, p), ``B = [V, V_tmp] [eps_b; eps_b_tmp]`` (d_out, p),
  ``dW = scale * B Aᵀ``, still one ``lowrank_linear`` call with ``U ← [U, U_tmp]``;
- a plain LoRA (``add_task(name, lora_rank=r)``, the first task before any subspace exists):
  ``lora_A`` (r, d_in), ``lora_B`` (d_out, r), ``dW = scale * lora_B lora_A``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.lowrank_linear import lowrank_linear
from ..ops.multi_task_linear import multi_task_linear
from ._cache import forward_cache, gemm_layout
from .common import TaskLayer, check_task_name, current_task_ids


def random_orthonormal(d: int, n: int, *, against: Optional[Tensor] = None, like: Tensor) -> Tensor:
    """(d, n) orthonormal columns drawn at random, orthogonal to ``against``'s columns; float64."""
    g = torch.randn(d, n, dtype=torch.float64, device=like.device)
    if against is not None and against.shape[1]:
        a = against.to(torch.float64)
        for _ in range(2):  # twice: one Gram-Schmidt pass loses orthogonality in rounding
            g = g - a @ (a.t() @ g)
    return torch.linalg.qr(g).Q


class ShareLinear(TaskLayer):
    """``y = base_layer(x) + scale * (x A) Bᵀ`` for the active task, A, B in a shared subspace.

    The wrapped ``nn.Linear`` is kept as ``base_layer`` (same object, weight untouched, frozen).
    Coefficients and extras are created frozen; :meth:`set_task` makes the active task's
    parameters (and only those) trainable. All adapter tensors take the base weight's dtype
    and device.
    """

    #: its forward reads the ids of ``share_kernels.task_ids`` (multi-task path)
    routes_task_ids = True

    def __init__(self, base_layer: nn.Linear, k: int = 32, p: int = 8, scale: float = 1.0):
        super().__init__()
        for arg, v in (("k", k), ("p", p)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ShareLinear: {arg} must be a positive int; got {v!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"ShareLinear: scale must be a finite number; got {scale!r}")
        self._init_base(base_layer, "ShareLinear")  # nn.Linear or transformers Conv1D
        #: the most columns U and V may have (the requested k, capped at min(d_in, d_out))
        self.max_k = min(k, self.in_features, self.out_features)
        self.p = p
        self.scale = float(scale)
        w = base_layer.weight
        # Placeholder bases until the continual procedure builds the subspace from LoRA factors
        # or the first task; a standalone layer trains in them directly.
        self.register_buffer("U", random_orthonormal(self.in_features, self.max_k, like=w).to(w.dtype))
        self.register_buffer("V", random_orthonormal(self.out_features, self.max_k, like=w).to(w.dtype))
        #: True once U, V came from an SVD (LoRA factors or tasks), False for the random placeholder
        self.subspace_built = False
        self.eps_a = nn.ParameterDict()
        self.eps_b = nn.ParameterDict()
        self._tasks: list[str] = []
        self.active_task: Optional[str] = None
        #: the task whose temporary directions or LoRA factors are present, if any
        self.training_task: Optional[str] = None
        for name in ("U_tmp", "V_tmp", "eps_a_tmp", "eps_b_tmp", "lora_A", "lora_B"):
            self.register_parameter(name, None)
        #: single-task forward through a cached merged weight ``W + dW`` while nothing trains
        #: (one ``F.linear``; one more d_out x d_in tensor per layer); see README
        self.merged_inference = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int = 32, p: int = 8, scale: float = 1.0) -> "ShareLinear":
        """Wrap ``linear`` without copying or changing its weight; U, V random orthonormal (d, k)."""
        return cls(linear, k=k, p=p, scale=scale)

    # ----------------------------------------------------------------- tasks

    @property
    def k(self) -> int:
        """Current subspace size: the columns of U and V."""
        return self.U.shape[1]

    def add_task(self, name: str, lora_rank: Optional[int] = None) -> None:
        """Add task ``name`` (frozen until :meth:`set_task`).

        The first task starts as an exact no-op (``eps_a`` LoRA-style uniform in ±1/√k,
        ``eps_b = 0``); a later task starts from the previous task's coefficients (forward
        transfer), so its output equals the previous task's. ``lora_rank=r`` (first task only)
        trains the task as a plain rank-r LoRA instead (``lora_A`` Kaiming-uniform, ``lora_B = 0``)
        until the procedure builds the subspace from it.
        """
        self._check_new(name)
        if self.training_task is not None:
            raise ValueError(
                f"task {self.training_task!r} still holds training directions; consolidate it (end_task) "
                f"before adding {name!r}"
            )
        if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
            raise ValueError(f"add_task: lora_rank must be a positive int or None; got {lora_rank!r}")
        if lora_rank is not None:
            if self._tasks:
                raise ValueError(f"lora_rank is only for the first task; this layer has tasks {self._tasks}")
            r = min(lora_rank, self.in_features, self.out_features)
            a = torch.empty(r, self.in_features, dtype=torch.float64)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A = self._new_param(a)
            self.lora_B = self._new_param(torch.zeros(self.out_features, r))
            self.training_task = name
        elif self._tasks:
            prev = self._tasks[-1]
            self.eps_a[name] = self._new_param(self.eps_a[prev].detach().clone())
            self.eps_b[name] = self._new_param(self.eps_b[prev].detach().clone())
        else:
            bound = 1.0 / math.sqrt(self.k)
            self.eps_a[name] = self._new_param(torch.empty(self.k, self.p).uniform_(-bound, bound))
            self.eps_b[name] = self._new_param(torch.zeros(self.k, self.p))
        self._tasks.append(name)

    def expand(self, phi: int) -> int:
        """Give the active task φ temporary directions per factor; returns the φ used.

        ``U_tmp`` (d_in, φ) and ``V_tmp`` (d_out, φ) are random orthonormal directions outside
        U and V; their coefficients start at zero, so the task's output does not change. φ is
        capped at ``min(d_in, d_out) - k``.
        """
        name = self.active_task
        if name is None or name != (self._tasks[-1] if self._tasks else None):
            raise ValueError(f"expand needs the last task added as the active task; active is {name!r}")
        if self.training_task is not None:
            raise ValueError(f"task {self.training_task!r} already holds training directions")
        if isinstance(phi, bool) or not isinstance(phi, int) or phi < 0:
            raise ValueError(f"expand: phi must be an int >= 0; got {phi!r}")
        phi = min(phi, self.in_features - self.k, self.out_features - self.k)
        if phi <= 0:
            return 0
        w = self.base_layer.weight
        self.U_tmp = self._new_param(random_orthonormal(self.in_features, phi, against=self.U, like=w))
        self.V_tmp = self._new_param(random_orthonormal(self.out_features, phi, against=self.V, like=w))
        self.eps_a_tmp = self._new_param(torch.zeros(phi, self.p))
        self.eps_b_tmp = self._new_param(torch.zeros(phi, self.p))
        self.training_task = name
        self.set_task(name)
        return phi

    def _extras(self) -> list[nn.Parameter]:
        names = ("U_tmp", "V_tmp", "eps_a_tmp", "eps_b_tmp", "lora_A", "lora_B")
        return [p for p in (getattr(self, n) for n in names) if p is not None]

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that train task ``name``: its coefficients and, while it is in
        training, its temporary directions (or LoRA factors)."""
        self._check_known(name)
        params = [self.eps_a[name], self.eps_b[name]] if name in self.eps_a else []
        return params + (self._extras() if name == self.training_task else [])

    def set_task(self, name: Optional[str]) -> None:
        """Make ``name`` the task the forward uses (None: the base layer alone) and its
        parameters the only trainable ones."""
        if name is not None:
            self._check_known(name)
        self.active_task = name
        for p in [*self.eps_a.values(), *self.eps_b.values(), *self._extras()]:
            p.requires_grad_(False)
        if name is not None:
            for p in self.task_parameters(name):
                p.requires_grad_(True)

    # ----------------------------------------------------------------- math

    def _factors_in(self, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(WA, Ea, WB, Eb) with the task's factors ``A = WA Ea``, ``B = WB Eb``."""
        if name == self.training_task and self.lora_A is not None:
            eye = torch.eye(self.lora_A.shape[0], dtype=self.lora_A.dtype, device=self.lora_A.device)
            return self.lora_A.t(), eye, self.lora_B, eye
        WA, Ea, WB, Eb = self.U, self.eps_a[name], self.V, self.eps_b[name]
        if name == self.training_task:
            WA, Ea = torch.cat([WA, self.U_tmp], 1), torch.cat([Ea, self.eps_a_tmp], 0)
            WB, Eb = torch.cat([WB, self.V_tmp], 1), torch.cat([Eb, self.eps_b_tmp], 0)
        return WA, Ea, WB, Eb

    def task_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A (d_in, r), B (d_out, r)) with ``delta_weight(name) = scale * B Aᵀ``."""
        self._check_known(name)
        WA, Ea, WB, Eb = self._factors_in(name)
        return WA @ Ea, WB @ Eb

    def delta_weight(self, name: str) -> Tensor:
        """Task ``name``'s update ``dW`` (d_out, d_in): the forward is ``F.linear(x, W + dW, b)``."""
        A, B = self.task_factors(name)
        return self.scale * (B @ A.t())

    def coordinates(self) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Every task's factors over one common basis: ``A_t = WA Ea_t``, ``B_t = WB Eb_t``.

        WA = [U, extra] (d_in, k + m), WB = [V, extra] (d_out, k + m), where the extra columns
        are the training task's temporary directions or LoRA factors (m = 0 without them).
        """
        extra_a = self.U_tmp if self.U_tmp is not None else (self.lora_A.t() if self.lora_A is not None else None)
        extra_b = self.V_tmp if self.V_tmp is not None else self.lora_B
        if extra_a is None:
            return self.U, self.V, {t: (self.eps_a[t], self.eps_b[t]) for t in self._tasks}
        m = extra_a.shape[1]
        coords = {}
        for t in self._tasks:
            if t == self.training_task:
                _, Ea, _, Eb = self._factors_in(t)
                if self.lora_A is not None:  # A = lora_Aᵀ = [U, lora_Aᵀ] [0; I]
                    Ea = torch.cat([Ea.new_zeros(self.k, m), Ea], 0)
                    Eb = torch.cat([Eb.new_zeros(self.k, m), Eb], 0)
            else:
                Ea = torch.cat([self.eps_a[t], self.eps_a[t].new_zeros(m, self.p)], 0)
                Eb = torch.cat([self.eps_b[t], self.eps_b[t].new_zeros(m, self.p)], 0)
            coords[t] = (Ea, Eb)
        return torch.cat([self.U, extra_a], 1), torch.cat([self.V, extra_b], 1), coords

    def set_subspace(self, U: Tensor, V: Tensor, coefficients: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Install bases U (d_in, k'), V (d_out, k') and every task's ``(eps_a, eps_b)`` (k', p),
        ``1 <= k' <= max_k``; drops the training task's extras. Task order is unchanged."""
        kk = U.shape[1] if U.dim() == 2 else -1
        if U.shape != (self.in_features, kk) or V.shape != (self.out_features, kk) or not 1 <= kk <= self.max_k:
            raise ValueError(
                f"set_subspace: U must be (d_in={self.in_features}, k) and V (d_out={self.out_features}, k) with "
                f"1 <= k <= {self.max_k}; got U {tuple(U.shape)}, V {tuple(V.shape)}"
            )
        if set(coefficients) != set(self._tasks):
            raise ValueError(
                f"set_subspace: coefficients must cover exactly the tasks {self._tasks}; got {sorted(coefficients)}"
            )
        for t, (ea, eb) in coefficients.items():
            if ea.shape != (kk, self.p) or eb.shape != (kk, self.p):
                raise ValueError(
                    f"set_subspace: task {t!r}: eps_a and eps_b must be (k={kk}, p={self.p}); "
                    f"got {tuple(ea.shape)} and {tuple(eb.shape)}"
                )
        w = self.base_layer.weight
        self.U = U.detach().to(device=w.device, dtype=w.dtype).contiguous()
        self.V = V.detach().to(device=w.device, dtype=w.dtype).contiguous()
        for t in self._tasks:
            ea, eb = coefficients[t]
            self.eps_a[t] = self._new_param(ea.detach().clone())
            self.eps_b[t] = self._new_param(eb.detach().clone())
        for name in ("U_tmp", "V_tmp", "eps_a_tmp", "eps_b_tmp", "lora_A", "lora_B"):
            setattr(self, name, None)
        self.training_task = None
        self.subspace_built = True
        self.set_task(self.active_task)

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None, check_ids: bool = True) -> Tensor:
        """x (..., d_in) -> (..., d_out).

        Without ``task_ids``: the active task (or the base layer alone when none is active).
        With ``task_ids`` (int, shape ``x.shape[:-1]`` or ``x.shape[:1]``, -1 = base only, ids in
        :attr:`tasks` order): each row uses its own task's coefficients, the multi-tenant path
        (:func:`~share_kernels.multi_task_linear`); inference only. ``check_ids=False`` skips the
        range check of the id values (a host sync on a GPU) for callers that checked them.
        Inside ``share_kernels.task_ids(model, ids)`` the ids of that block (in the calling
        thread only) are used when ``task_ids`` is not given.
        """
        if task_ids is not None:
            return self._forward_multi(x, task_ids, check_ids)
        routed = current_task_ids(self)  # set by share_kernels.task_ids in this thread, checked there
        if routed is not None:
            return self._forward_multi(x, routed, check_ids=False)
        if self.active_task is None:
            return self.base_layer(x)
        if self.merged_inference:
            w = self._merged_weight(self.active_task)
            if w is not None:
                return F.linear(x, w, self.base_layer.bias)
        WA, C = self._single_operands(self.active_task)
        return lowrank_linear(x, self.base_weight(), self.base_layer.bias, WA, C)

    def _single_operands(self, name: str) -> tuple[Tensor, Tensor]:
        """The ``(U, C)`` operands of task ``name``'s ``lowrank_linear`` call, of the smaller of
        two equal ranks, cached while nothing trains (:mod:`share_kernels.nn._cache`):

        - the task's own factors, rank p: ``U = A = WA Ea`` (d_in, p), ``C = scale · Bᵀ``
          (p, d_out), when p < k' (the columns of WA: k, plus φ while the task trains);
        - the subspace, rank k': ``U = WA`` (d_in, k'), ``C = scale · (Ea Ebᵀ) WBᵀ``, otherwise.

        Both give ``x · dWᵀ`` (they differ in rounding only). The low-rank work of a forward
        and its backward is proportional to the rank: with the default k = 32 and p = 8 the
        factors are 4x cheaper than the subspace, and a training step at k = 8 with φ = 2
        temporary directions runs at rank 8, peft's LoRA cost at r = p, not 10.
        """
        sources = [self.U, self.V]
        if name in self.eps_a:
            sources += [self.eps_a[name], self.eps_b[name]]
            if torch.is_grad_enabled() and sources[2].requires_grad:
                return self._operands_of(name)  # a training forward: the cache would only recompute
        if name == self.training_task:
            sources += self._extras()
        return forward_cache(self).get(
            "single", sources, (name, self.training_task, self.scale), lambda: self._operands_of(name)
        )

    def _operands_of(self, name: str) -> tuple[Tensor, Tensor]:
        """:meth:`_single_operands`, computed."""
        if name == self.training_task:
            if self.lora_A is not None:
                return self.lora_A.t(), self.scale * self.lora_B.t()  # lora_A.t(): already k-major
            ea, eb, ea_tmp = self.eps_a[name], self.eps_b[name], self.eps_a_tmp
            if ea_tmp is not None and ea.shape[1] < ea.shape[0] + ea_tmp.shape[0]:
                # the factors of a training step, A = U ea + U_tmp ea_tmp, B likewise, with no
                # concatenation (fewer ops and autograd nodes: a step recomputes them)
                Ut = self._U_for_gemm().t()  # (k, d_in), contiguous on a CPU
                At = torch.addmm(ea_tmp.t() @ self.U_tmp.t(), ea.t(), Ut)
                eb_tmp, s = self.eps_b_tmp, self.scale
                Ct = torch.addmm(eb_tmp.t() @ self.V_tmp.t(), eb.t(), self.V.t(), beta=s, alpha=s)
                return At.t(), Ct
        WA, Ea, WB, Eb = self._factors_in(name)
        if Ea.shape[1] < WA.shape[1]:
            # Aᵀ = Eaᵀ WAᵀ built contiguous: A = Aᵀ.t() has the k-major storage of gemm_layout
            return (Ea.t() @ WA.t()).t(), self.scale * (Eb.t() @ WB.t())
        WA = self._U_for_gemm() if WA is self.U else gemm_layout(WA)
        return WA, self.scale * (Ea @ Eb.t()) @ WB.t()

    def _merged_weight(self, name: str) -> Optional[Tensor]:
        """``W + delta_weight(name)`` (computed in fp32 or wider, stored in W's dtype), cached;
        None while the task trains (a merged copy cannot carry its gradient)."""
        w = self.base_weight()  # (d_out, d_in); a transposed view for a Conv1D base
        # the parameter itself, not the view: a Conv1D's .t() is a new object every call, which
        # the cache (identity per source) would take for a change
        sources = [self.base_layer.weight, self.U, self.V]
        if name in self.eps_a:
            sources += [self.eps_a[name], self.eps_b[name]]
        if name == self.training_task:
            sources += self._extras()
        cache = forward_cache(self)
        if not cache.usable(sources):
            return None

        def compute() -> Tensor:
            acc = torch.promote_types(w.dtype, torch.float32)
            A, B = self.task_factors(name)
            return (w.to(acc) + self.scale * (B.to(acc) @ A.to(acc).t())).to(w.dtype)

        return cache.get("merged", sources, (name, self.training_task, self.scale), compute)

    def _U_for_gemm(self) -> Tensor:
        """U in the storage order the CPU GEMM ``x @ U`` is fastest with (cached, even while a
        task trains: U itself never does)."""
        return forward_cache(self).get("U", (self.U,), None, lambda: gemm_layout(self.U))

    def cores(self) -> Tensor:
        """(T, k, k): ``cores[t] = scale * eps_a[t] eps_b[t]ᵀ`` in task-id order."""
        if self.training_task is not None:
            raise ValueError(
                f"task {self.training_task!r} is still in training (temporary directions or LoRA factors): "
                "end the task before using task_ids"
            )
        if not self._tasks:
            return self.U.new_zeros(0, self.k, self.k)
        # One batched product (3 launches whatever T is). The forward caches it while nothing
        # trains and rebuilds it when a coefficient changes (an optimizer step bumps its version).
        eps_a = torch.stack([self.eps_a[t] for t in self._tasks])
        eps_b = torch.stack([self.eps_b[t] for t in self._tasks])
        return self.scale * torch.bmm(eps_a, eps_b.transpose(1, 2))

    def _forward_multi(self, x: Tensor, task_ids: Tensor, check_ids: bool = True) -> Tensor:
        # cached while nothing trains: no per-forward stacking of T coefficient pairs
        sources = [self.eps_a[t] for t in self._tasks] + [self.eps_b[t] for t in self._tasks] + self._extras()
        state = (tuple(self._tasks), self.training_task, self.scale)
        cores = forward_cache(self).get("cores", sources, state, self.cores)
        if torch.is_grad_enabled() and (x.requires_grad or cores.requires_grad):
            raise RuntimeError(
                "ShareLinear: the task_ids forward is inference-only; run it under torch.no_grad() or "
                "torch.inference_mode(), or train one task at a time with set_task()"
            )
        w = self.base_weight()
        U = self._U_for_gemm()
        return multi_task_linear(x, w, self.base_layer.bias, U, cores, self.V, task_ids, check_ids=check_ids)

    # ----------------------------------------------------------------- save / load / stats

    def adapter_config(self) -> dict:
        """JSON-able keyword arguments that rebuild this layer with :meth:`from_linear`."""
        return {"k": self.max_k, "p": self.p, "scale": self.scale}

    def _check_saveable(self) -> None:
        if self.training_task is not None:
            raise ValueError(
                f"task {self.training_task!r} is still in training (temporary directions or LoRA factors); "
                "end it before saving"
            )

    def shared_tensors(self) -> dict[str, Tensor]:
        """What every task shares: ``{"U": (d_in, k), "V": (d_out, k)}``."""
        self._check_saveable()
        return {"U": self.U, "V": self.V}

    def task_tensors(self, name: str) -> dict[str, Tensor]:
        """Task ``name``'s own part: ``{"eps_a": (k, p), "eps_b": (k, p)}``."""
        self._check_known(name)
        self._check_saveable()
        return {"eps_a": self.eps_a[name].detach(), "eps_b": self.eps_b[name].detach()}

    def load_adapter_state(self, shared: dict[str, Tensor], tasks: dict[str, dict[str, Tensor]]) -> None:
        """Replace bases and tasks (in ``tasks``' order) by saved tensors; ValueError naming the
        tensor and the expected and found shapes when they do not fit. Loaded bases count as built."""
        if set(shared) != {"U", "V"}:
            raise ValueError(f"shared tensors must be exactly ['U', 'V']; got {sorted(shared)}")
        U, V = shared["U"], shared["V"]
        kk = U.shape[1] if U.dim() == 2 else -1
        if U.shape != (self.in_features, kk) or not 1 <= kk <= self.max_k:
            raise ValueError(
                f"U: expected (d_in={self.in_features}, k) with 1 <= k <= {self.max_k}; got {tuple(U.shape)}"
            )
        if V.shape != (self.out_features, kk):
            raise ValueError(f"V: expected (d_out={self.out_features}, k={kk}); got {tuple(V.shape)}")
        coefficients = {}
        for t, tensors in tasks.items():
            check_task_name(t)
            if set(tensors) != {"eps_a", "eps_b"}:
                raise ValueError(f"task {t!r}: tensors must be exactly ['eps_a', 'eps_b']; got {sorted(tensors)}")
            for n, v in tensors.items():
                if v.shape != (kk, self.p):
                    raise ValueError(f"task {t!r}: {n}: expected (k={kk}, p={self.p}); got {tuple(v.shape)}")
            coefficients[t] = (tensors["eps_a"], tensors["eps_b"])
        self.eps_a, self.eps_b = nn.ParameterDict(), nn.ParameterDict()
        self._tasks = list(tasks)
        self.active_task = self.training_task = None
        self.set_subspace(U, V, coefficients)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, p={self.p}, "
            f"scale={self.scale}, tasks={len(self._tasks)}"
        )


def set_merged_inference(model: nn.Module, enabled: bool = True) -> int:
    """Turn :attr:`ShareLinear.merged_inference` on or off for every Share layer of ``model``;
    returns how many layers were set. While nothing trains, a merged layer's single-task
    forward is one ``F.linear`` with a cached ``W + dW`` (rebuilt on any change of the task,
    its coefficients or the bases), at the cost of one more d_out x d_in tensor per layer."""
    n = 0
    for m in model.modules():
        if isinstance(m, ShareLinear):
            m.merged_inference = bool(enabled)
            n += 1
    return n
