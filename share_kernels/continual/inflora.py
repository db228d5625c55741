"""InfLoRA: design each task's ``B_t`` outside the old tasks' input space, keep that space in a
DualGPM gradient memory (Liang & Li, CVPR 2024; follows the official code, liangyanshuo/InfLoRA).

Per adapted layer (:class:`~share_kernels.nn.InfLoRALinear`), with C the layer's input covariance
``Σ x xᵀ / n`` (d_in x d_in, accumulated in float32 by forward hooks over the task's batches):

1. ``begin_task``: run the model (all previous branches active) on the task's batches, project
   ``Ĉ = C − M Mᵀ C`` (remove mode, M the memory) or ``Ĉ = Q Qᵀ C`` (retain mode, Q the stored
   complement), and set ``B_t = scale · (top-r left singular vectors of Ĉ)ᵀ`` (official scale
   1/√3). Since ``B_t`` lies outside the memory, ``x B_tᵀ ≈ 0`` for old tasks' inputs, so
   training ``A_t`` barely moves old tasks' outputs.
2. ``end_task``: run the trained model on the batches again and update the memory
   (:class:`DualGPM`) with the threshold ``ε_t = λ_b + (λ_e − λ_b) · min(t, T) / T`` (t = 0 for
   the first task, T the planned number of tasks; λ_b = ``threshold``, λ_e = ``threshold_end``,
   official defaults 0.95 and 1).

Saturation: once a layer's protected space covers (numerically) all of its inputs, ``P C`` is 0
and ``B_t`` gets zero rows: the task cannot learn through that layer. ``begin_task`` then warns
once (:class:`InfLoRASaturationWarning`, naming the layers, their protected dimension and the
directions they got) and the :class:`InfLoRAReport` of ``end_task`` lists them.

PS-LoRA as a plug-in (``stability=``): ``extra_loss`` adds PS-LoRA's ``stability_loss`` of the
trained ``A_t`` against the earlier tasks' accumulated update, and with ``merge`` finished
branches are magnitude-merged instead of summed. ``target_slices`` adapts output row ranges of
fused projections (the k and v thirds of a ViT's qkv).

Energy: ``energy="covariance"`` (default, the official code) measures a direction by the square
of the covariance's singular value (σ⁴ of the data) and treats C as the representation
(residual ``R = P C``); ``energy="data"`` measures it by the covariance's eigenvalue (σ² of the
data, GPM on the raw inputs: residual ``R = P C P``). All layers' projections go through one
``project_complement_grouped`` call per mode; layers that see the same inputs and hold equal
memories (k and v of a block) are designed and updated once.

Where this differs from the official code, deliberately:

- Left singular vectors and σ² come from a symmetric eigendecomposition of ``R Rᵀ`` (or of R
  when it is PSD), not an SVD: the same vectors and values, several times cheaper. Directions
  below the eigensolver's noise floor are never taken.
- The d/2 switch runs after every update, the first included: the official first-task branch
  labels a memory of ≥ d/2 columns "retain" without taking its complement.
- The retain-mode shrink takes the complement of the moved directions inside span(Q) by a QR in
  Q's coordinates; the official SVD of ``Q − U_r U_rᵀ Q`` gives the same span.
- ``ε_t`` stops at 1 for t ≥ T; new memory columns are re-orthogonalized against the old ones
  (float32 drift would otherwise break ``project_complement``'s orthonormality contract).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.inflora_linear import DEFAULT_SCALE, InfLoRALinear
from ..ops.project_complement import project_complement, project_complement_grouped
from .method import Method, ParamCounts, check_target_slices, register_method
from .pslora import StabilityConfig, magnitude_merge

ENERGIES = ("covariance", "data")


@dataclass
class InfLoRAConfig:
    """InfLoRA's options.

    Args:
        r: rank of each task's branch (official 10); also the LoRA rank ``adapter_stats``
            compares with.
        scale: norm of ``B_t``'s rows (official 1/√3).
        threshold: λ_b, the memory's energy threshold for the first task (official 0.95; 0.98 for
            ImageNet-R); it rises linearly to ``threshold_end`` at task T.
        threshold_end: λ_e, the threshold from task T on (official 1.0; must be >= ``threshold``).
            Below 1 the memory stops growing towards the full input space, leaving room for
            streams longer than T.
        total_tasks: T, the planned number of tasks.
        energy: ``"covariance"`` (official: σ² of the covariance) or ``"data"`` (σ² of the inputs).
        fold: merge each finished task's branch into the layer's folded delta at ``end_task``,
            so the forward keeps one branch's cost (at the price of a d_out x d_in buffer per layer).
        stability: PS-LoRA on top of InfLoRA (:class:`~share_kernels.continual.pslora.StabilityConfig`,
            a dict of its fields, or True for its defaults): ``extra_loss`` becomes
            ``lam · Σ_layers stability_loss`` of the trained ``A_t`` against the earlier tasks'
            accumulated update, and with ``merge`` finished tasks are magnitude-merged instead of
            summed. Implies folding (the accumulated update is the loss's operand).
        target_slices: ``{name suffix: [[start, stop], ...]}``: adapt only these output rows of the
            matching layers (fused projections: ``{"qkv": [[dim, 3 * dim]]}`` adapts the k and v
            thirds of a ViT's qkv); the other rows stay the base layer's, bit for bit.
    """

    r: int = 10
    scale: float = DEFAULT_SCALE
    threshold: float = 0.95
    threshold_end: float = 1.0
    total_tasks: int = 10
    energy: str = "covariance"
    fold: bool = False
    stability: Optional[StabilityConfig] = None
    target_slices: Optional[dict] = None

    def __post_init__(self):
        for name in ("r", "total_tasks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InfLoRAConfig.{name} must be an int >= 1; got {v!r}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"InfLoRAConfig.scale must be a finite number > 0; got {s!r}")
        self.scale = float(s)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ValueError(f"InfLoRAConfig.threshold must lie in (0, 1]; got {t!r}")
        self.threshold = float(t)
        te = self.threshold_end
        if isinstance(te, bool) or not isinstance(te, (int, float)) or not 0.0 < te <= 1.0:
            raise ValueError(f"InfLoRAConfig.threshold_end must lie in (0, 1]; got {te!r}")
        if te < self.threshold:
            raise ValueError(
                f"InfLoRAConfig.threshold_end ({te!r}) must be >= threshold ({self.threshold!r}): the schedule rises"
            )
        self.threshold_end = float(te)
        if self.energy not in ENERGIES:
            raise ValueError(f"InfLoRAConfig.energy must be one of {list(ENERGIES)}; got {self.energy!r}")
        if not isinstance(self.fold, bool):
            raise ValueError(f"InfLoRAConfig.fold must be a bool; got {self.fold!r}")
        self.stability = StabilityConfig.coerce(self.stability, "InfLoRAConfig.stability")
        self.target_slices = check_target_slices(self.target_slices, "InfLoRAConfig.target_slices")

    @property
    def merge(self) -> str:
        """How finished branches combine in the layers: ``"magnitude"`` with PS-LoRA's merge on."""
        return "magnitude" if self.stability is not None and self.stability.merge else "sum"

    def threshold_at(self, t: int) -> float:
        """``ε_t = λ_b + (λ_e − λ_b) · min(t, T) / T`` for the task with index t (0 = first)."""
        lb, le = self.threshold, self.threshold_end
        return lb + (le - lb) * min(t, self.total_tasks) / self.total_tasks


# ------------------------------------------------------------------------- the memory


@dataclass
class GPMUpdate:
    """One layer's memory update. Memory sizes are the protected dimension (d minus the stored
    complement in retain mode); energies are fractions of the task's total energy (float64)."""

    mode_before: str
    mode_after: str
    memory_before: int
    memory_after: int
    added: int
    threshold: float
    captured_before: float
    captured_after: float


def left_singular(R: Tensor, symmetric: bool = False) -> tuple[Tensor, Tensor, int]:
    """(U (d, d), σ² (d,) float64, q) of R (d, n), descending: the eigenpairs of ``R Rᵀ``, or of
    R itself when it is symmetric PSD (σ² = its eigenvalues squared). q counts the leading
    values above the eigensolver's noise floor (d · eps · the largest eigenvalue it computed).
    A symmetric eigendecomposition costs a fraction of an SVD; only U and σ² are needed."""
    G = R if symmetric else R @ R.t()
    vals, U = torch.linalg.eigh((G + G.t()) / 2)
    vals = vals.to(torch.float64).flip(0)
    top = float(vals[0]) if vals.numel() else 0.0
    q = int((vals > top * G.shape[0] * torch.finfo(G.dtype).eps).sum()) if top > 0 else 0
    vals = vals.clamp_min(0)
    return U.flip(1), (vals.square() if symmetric else vals), q


def _orthonormalize(V: Tensor, against: Optional[Tensor]) -> Tensor:
    """Columns of V made orthonormal and orthogonal to ``against``'s (two Gram-Schmidt passes)."""
    if against is not None and against.shape[1]:
        for _ in range(2):
            V = V - against @ (against.t() @ V)
    return torch.linalg.qr(V).Q


class DualGPM:
    """One layer's DualGPM memory: orthonormal ``basis`` (d, m), float32.

    ``retain=False`` ("remove" mode): the basis spans the protected space (old tasks' inputs).
    ``retain=True`` ("retain" mode): it spans the complement, stored instead once the protected
    space exceeds d/2 columns. The protected dimension never exceeds d.
    """

    def __init__(self, d: int, basis: Optional[Tensor] = None, retain: bool = False):
        self.d = d
        self.basis = torch.zeros(d, 0) if basis is None else basis
        if self.basis.dim() != 2 or self.basis.shape[0] != d or self.basis.shape[1] > d:
            raise ValueError(f"DualGPM: basis must be (d={d}, m) with m <= d; got {tuple(self.basis.shape)}")
        self.retain = bool(retain)

    @classmethod
    def from_layer(cls, layer: InfLoRALinear) -> "DualGPM":
        return cls(layer.in_features, layer.memory, layer.memory_retain)

    def to_layer(self, layer: InfLoRALinear) -> None:
        layer.set_memory(self.basis, self.retain)

    @property
    def mode(self) -> str:
        """The ``project_complement`` mode that keeps the part of X outside the protected space."""
        return "retain" if self.retain else "remove"

    @property
    def dim(self) -> int:
        """Dimension of the protected space."""
        return self.d - self.basis.shape[1] if self.retain else self.basis.shape[1]

    def protected_basis(self) -> Tensor:
        """(d, dim) orthonormal basis of the protected space (the stored basis, or its complement)."""
        if not self.retain:
            return self.basis
        m = self.basis.shape[1]
        if m == 0:
            return torch.eye(self.d, dtype=self.basis.dtype, device=self.basis.device)
        return torch.linalg.qr(self.basis, mode="complete").Q[:, m:]

    def project(self, X: Tensor) -> Tensor:
        """``P X``, the part of X (d, n) outside the protected space."""
        return project_complement(X, self.basis.to(X.dtype), self.mode)

    def residual(self, cov: Tensor, energy: str, projected: Optional[Tensor] = None) -> Tensor:
        """What the energy is measured on: ``P C`` (covariance energy) or ``P C P`` (data energy)."""
        pc = self.project(cov) if projected is None else projected
        return pc if energy == "covariance" else self.project(pc.t())

    @staticmethod
    def total_energy(cov: Tensor, energy: str) -> float:
        """``Σ σ(C)² = ‖C‖_F²`` (covariance) or ``tr C`` (data), in float64."""
        c = cov.to(torch.float64)
        return float(c.square().sum()) if energy == "covariance" else float(c.diagonal().sum())

    def captured(self, cov: Tensor, energy: str) -> float:
        """Fraction of ``cov``'s energy inside the protected space, in float64:
        ``1 − ‖P C‖_F² / ‖C‖_F²`` or ``1 − tr(P C) / tr C``."""
        total = self.total_energy(cov, energy)
        if total <= 0:
            return 1.0
        c = cov.to(torch.float64)
        pc = project_complement(c, self.basis.to(torch.float64), self.mode)
        rest = float(pc.square().sum()) if energy == "covariance" else float(pc.diagonal().sum())
        return 1.0 - rest / total

    def _directions(self, R: Tensor, energy: str, symmetric: bool) -> tuple[Tensor, Tensor]:
        """(left singular directions of R (d, q), their energies (q,) float64), descending,
        above the noise floor only. Covariance energy: σ(R)²; data energy (R = P C P, PSD): σ(R)."""
        U, sq, keep = left_singular(R, symmetric)
        e = sq if energy == "covariance" else sq.sqrt()
        return U[:, :keep], e[:keep]

    @torch.no_grad()
    def update(
        self, cov: Tensor, threshold: float, energy: str = "covariance", residual: Optional[Tensor] = None
    ) -> GPMUpdate:
        """Add the directions of ``cov`` (d, d) that the memory misses, as the official code does.

        First task (empty memory): keep the top directions whose cumulative energy fraction stays
        under ε (at least one). Remove mode: add the top residual directions until the captured
        fraction reaches ε (capped at d columns). Retain mode: move the top residual directions out
        of the stored complement while the uncaptured fraction is at least 1 − ε. Then, when the
        protected space exceeds d/2 in remove mode, store its complement and switch to retain.
        ``residual``: :meth:`residual` precomputed (the grouped path).
        """
        if energy not in ENERGIES:
            raise ValueError(f"DualGPM.update: energy must be one of {list(ENERGIES)}; got {energy!r}")
        if cov.shape != (self.d, self.d):
            raise ValueError(f"DualGPM.update: cov must be (d={self.d}, d={self.d}); got {tuple(cov.shape)}")
        cov = cov.float()
        self.basis = self.basis.to(device=cov.device, dtype=torch.float32)
        mode_before, dim_before = self.mode, self.dim
        total = self.total_energy(cov, energy)
        if total <= 0:  # the layer saw only zero inputs: nothing to protect
            return GPMUpdate(mode_before, mode_before, dim_before, dim_before, 0, threshold, 1.0, 1.0)
        first = self.basis.shape[1] == 0 and not self.retain
        R = cov if first else (self.residual(cov, energy) if residual is None else residual)
        U, e = self._directions(R, energy, symmetric=first or energy == "data")
        captured_before = 1.0 - float(e.sum()) / total if not first else 0.0
        ratio = (e / total).tolist()
        m = self.basis.shape[1]
        if first:
            acc, r = 0.0, 0
            for x in ratio:  # np.sum(np.cumsum(ratio) < threshold), at least 1
                acc += x
                if acc >= threshold:
                    break
                r += 1
            r = min(max(r, 1), U.shape[1])
            self.basis = _orthonormalize(U[:, :r], None)
        elif not self.retain:
            acc, r = captured_before, 0
            for x in ratio[: self.d - m]:
                if acc >= threshold:
                    break
                acc, r = acc + x, r + 1
            if r:
                self.basis = torch.cat([self.basis, _orthonormalize(U[:, :r], self.basis)], 1)
        else:
            acc, r = 1.0 - captured_before, 0
            for x in ratio[:m]:
                if acc < 1.0 - threshold:
                    break
                acc, r = acc - x, r + 1
            if r:
                # The moved directions lie in span(Q): in Q's coordinates they are a = Qᵀ U_r; the
                # new complement is Q times the complement of span(a) in R^m (the official code
                # gets the same span from an SVD of Q − U_r U_rᵀ Q).
                a = self.basis.t() @ U[:, :r]
                self.basis = self.basis @ torch.linalg.qr(a, mode="complete").Q[:, r:]
        if not self.retain and self.basis.shape[1] > self.d / 2:
            k = self.basis.shape[1]
            self.basis = torch.linalg.qr(self.basis, mode="complete").Q[:, k:].contiguous()
            self.retain = True
        return GPMUpdate(
            mode_before, self.mode, dim_before, self.dim, self.dim - dim_before, threshold,
            captured_before, self.captured(cov, energy),
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"DualGPM(d={self.d}, protected={self.dim}, mode={self.mode!r})"


def project_all(memories: Sequence[DualGPM], Xs: Sequence[Tensor], grouped: bool = True) -> list[Tensor]:
    """``[mem.project(X)]`` for every layer: one ``project_complement_grouped`` call per mode
    (``grouped=False``: one ``project_complement`` call per layer)."""
    if not grouped:
        return [mem.project(X) for mem, X in zip(memories, Xs)]
    out: list[Optional[Tensor]] = [None] * len(Xs)
    for mode in ("remove", "retain"):
        idx = [i for i, mem in enumerate(memories) if mem.mode == mode]
        if idx:
            res = project_complement_grouped(
                [Xs[i] for i in idx], [memories[i].basis.to(Xs[i].dtype) for i in idx], mode
            )
            for i, y in zip(idx, res):
                out[i] = y
    return out  # type: ignore[return-value]


@torch.no_grad()
def design_rows(projected: Tensor, memory: DualGPM, r: int, scale: float) -> Tensor:
    """``B_t`` (r, d): ``scale ·`` the top-r left singular vectors of ``projected`` (= ``P C``),
    re-projected outside the memory and re-orthonormalized; rows beyond the numerical rank of
    ``P C`` (no free direction carries this task's inputs) are zero."""
    d = projected.shape[0]
    # float64: the eigenpairs of (P C)(P C)ᵀ square the condition number, and in fp32 the noise
    # floor would drop directions under ~1% of the top singular value (inputs with a few
    # high-variance features would get a branch of rank 1 or 2 instead of r).
    U, _, q = left_singular(projected.double())
    U = U.float()
    q = min(r, q)
    B = projected.new_zeros(r, d, dtype=torch.float32)
    if q:
        V = memory.project(U[:, :q].contiguous())  # once more: the eigensolver's rounding leaves a trace of M
        Q, Rr = torch.linalg.qr(V)
        ok = Rr.diagonal().abs() > 0.5  # a direction that was mostly inside the memory is dropped
        Q = Q[:, ok]
        B[: Q.shape[1]] = scale * Q.t()
    return B


# ------------------------------------------------------------------------- input covariance


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def input_covariances(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable
) -> dict[str, tuple[Tensor, int]]:
    """Run ``model`` (in eval mode, no grad) on ``batches`` and return, per layer, its input
    covariance ``Σ x xᵀ / n`` (d_in, d_in) float32 and the row count n.

    A batch is a tensor (``model(batch)``), a tuple / list (``model(*batch)``) or a dict
    (``model(**batch)``). Every row of a layer's input ``x.reshape(-1, d_in)`` counts, except
    when the batch is a dict with an ``attention_mask`` whose shape equals the input's leading
    dims (B, S): then only rows where the mask is nonzero count (padding is left out).
    Layers that receive the same input tensor (q, k, v) share one ``xᵀx`` product per batch,
    and, when they did so in every batch, one covariance tensor (the same object).
    """
    sums = {n: None for n in layers}
    counts = dict.fromkeys(layers, 0)
    inputs: dict[str, list[int]] = {n: [] for n in layers}  # which input each call saw
    state = {"mask": None, "cache": {}, "serial": 0}

    def hook(name):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            # Same tensor object (q, k, v of one block): reuse its product. The weak reference
            # tells a live tensor from a new one that got a freed tensor's id.
            hit = state["cache"].get(id(x))
            if hit is None or hit[0]() is not x:
                rows = x.reshape(-1, x.shape[-1])
                mask = state["mask"]
                if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                    rows = rows[mask.reshape(-1).to(rows.device) != 0]
                rows = rows.float()
                state["serial"] += 1
                hit = state["cache"][id(x)] = (weakref.ref(x), rows.t() @ rows, rows.shape[0], state["serial"])
            _, xtx, n, serial = hit
            sums[name] = xtx.clone() if sums[name] is None else sums[name].add_(xtx)
            counts[name] += n
            inputs[name].append(serial)

        return fn

    training = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_hook(hook(n), with_kwargs=True) for n, layer in layers.items()]
    try:
        model.eval()
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            state["mask"], state["cache"] = mask, {}
            _call(model, batch)
            state["cache"] = {}
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.training = t
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise ValueError(f"layers {empty[:8]} received no input rows from the batches (not called, or all masked)")
    shared: dict[tuple, Tensor] = {}
    out = {}
    for n in layers:
        key = tuple(inputs[n])
        if key not in shared:
            shared[key] = sums[n] / counts[n]
        out[n] = (shared[key], counts[n])
    return out


# ------------------------------------------------------------------------- the method


class InfLoRASaturationWarning(UserWarning):
    """A layer's free input space gave a task fewer directions than r (zero rows of ``B_t``)."""


@dataclass
class InfLoRAReport:
    """What ``end_task`` did to every layer's memory (:class:`GPMUpdate` by layer name).

    ``directions``: per layer, how many nonzero rows the task's ``B_t`` had (of r);
    ``saturated``: the layers where that was 0 (the task learned nothing there).
    ``replaced``: with PS-LoRA's magnitude merge on, per layer the fraction of the history's
    entries taken from this task (empty otherwise)."""

    after: str
    threshold: float
    layers: dict[str, GPMUpdate] = field(default_factory=dict)
    directions: dict[str, int] = field(default_factory=dict)
    r: int = 0
    replaced: dict[str, float] = field(default_factory=dict)

    @property
    def saturated(self) -> list[str]:
        return [n for n, k in self.directions.items() if k == 0]

    def __str__(self) -> str:
        ups = list(self.layers.values())
        mem = [u.memory_after for u in ups]
        retain = sum(u.mode_after == "retain" for u in ups)
        cap = [u.captured_after for u in ups]
        out = (
            f"DualGPM after {self.after!r} (ε = {self.threshold:.4g}): {len(ups)} layers, protected dims "
            f"{min(mem, default=0)}..{max(mem, default=0)}, {retain} in retain mode, captured energy "
            f"{min(cap, default=1):.4f}..{max(cap, default=1):.4f}"
        )
        short = [n for n, k in self.directions.items() if k < self.r]
        if short:
            sat = self.saturated
            out += (
                f"; B_t got fewer than r={self.r} directions in {len(short)} layer(s)"
                + (f", none in {len(sat)} (saturated: {', '.join(sat[:4])}{', ...' if len(sat) > 4 else ''})" if sat else "")
            )
        if self.replaced:
            vals = list(self.replaced.values())
            out += f"; magnitude merge took {sum(vals) / len(vals):.3%} of entries from the task"
        return out


def _warn_short(task: str, layers: Mapping[str, InfLoRALinear], got: Mapping[str, int], r: int) -> None:
    """One warning naming every layer whose ``B_t`` got fewer than r directions."""
    short = [n for n in layers if got[n] < r]
    if not short:
        return
    sat = [n for n in short if got[n] == 0]
    shown = "; ".join(
        f"{n}: {got[n]}/{r} directions, protected {layers[n].memory_dim}/{layers[n].in_features}" for n in short[:6]
    ) + (f"; ... ({len(short)} layers in all)" if len(short) > 6 else "")
    what = (
        f"{len(sat)} layer(s) have no free direction left for task {task!r} (saturated: it learns nothing there)"
        if sat
        else f"task {task!r} gets fewer than r={r} directions in {len(short)} layer(s)"
    )
    warnings.warn(
        f"InfLoRA: {what}: {shown}. The memory holds the input space of the earlier tasks; to keep room, "
        "raise total_tasks to the stream's real length, or lower threshold / threshold_end.",
        InfLoRASaturationWarning,
        stacklevel=4,  # the caller of ContinualLearner.begin_task
    )


@register_method
class InfLoRAMethod(Method):
    """InfLoRA behind :class:`~share_kernels.continual.ContinualLearner` (``method="inflora"``).

    ``begin_task(name, batches)`` designs ``B_t`` per layer from the task's inputs (batches are
    required); ``end_task(name, batches)`` updates the DualGPM memory from the trained model's
    inputs and returns an :class:`InfLoRAReport`. ``extra_loss`` is 0, or PS-LoRA's stability
    loss with ``stability``. The forward needs no task id: every branch up to the selected task
    is active (``set_task`` picks how far; with the magnitude merge, every finished task runs
    the merged model).
    """

    name = "inflora"
    layer_cls = InfLoRALinear
    config_cls = InfLoRAConfig
    #: False: project layer by layer instead of one grouped call per mode (the benchmark's baseline)
    grouped: bool = True

    def __init__(self, layers: dict[str, InfLoRALinear], config: InfLoRAConfig):
        super().__init__(layers, config)
        self.check_layers_match({"r": "r", "scale": "scale", "merge": "merge"})
        self.check_slices_match()

    @classmethod
    def layer_kwargs(cls, config: InfLoRAConfig) -> dict:
        kw = {"r": config.r, "scale": config.scale}
        if config.merge != "sum":
            kw["merge"] = config.merge
        return kw

    @classmethod
    def param_counts(
        cls, d_in: int, d_out: int, config: InfLoRAConfig, layer: Optional[InfLoRALinear] = None
    ) -> ParamCounts:
        """Trained per task: ``A_t``, ``d_out r``. Stored per task: ``A_t`` and ``B_t``,
        ``r (d_in + d_out)`` (d_out: the adapted rows of a sliced layer). Shared: the memory's stored columns ``d_in m`` and the folded
        delta ``d_out d_in`` when present (0 when only shapes are known)."""
        r = config.r if layer is None else layer.r
        if layer is not None:
            d_out = layer.adapted_out
        shared = 0
        if layer is not None:
            shared = layer.memory.numel() + (layer.folded_delta.numel() if layer.folded_delta is not None else 0)
        return ParamCounts(d_out * r, r * (d_in + d_out), shared)

    def _covariances(self, batches: Optional[Iterable], when: str) -> list[Tensor]:
        if batches is None:
            raise ValueError(f"InfLoRA needs the task's batches at {when}: its inputs design B_t and the memory")
        if self.model is None:
            raise ValueError(
                "InfLoRAMethod.model is not set: use ContinualLearner, or set method.model to the wrapped model"
            )
        covs = input_covariances(self.model, self.layers, batches)
        for n in self.layers:
            if not bool(torch.isfinite(covs[n][0]).all()):
                raise ValueError(
                    f"InfLoRA {when}: the inputs of layer {n!r} hold NaN or infinite values (check the task's batches)"
                )
        return [covs[n][0] for n in self.layers]

    @staticmethod
    def _representatives(covs: list[Tensor], mems: list[DualGPM]) -> list[int]:
        """For each layer, the first layer with the same covariance object and an equal memory
        (k and v of one block, as the official code adapts): their work is done once."""
        rep = []
        for i, (c, m) in enumerate(zip(covs, mems)):
            same = (
                j for j in range(i)
                if rep[j] == j and covs[j] is c and mems[j].retain == m.retain
                and mems[j].basis.shape == m.basis.shape and torch.equal(mems[j].basis, m.basis)
            )  # fmt: skip
            rep.append(next(same, i))
        return rep

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        previous = next(iter(self.layers.values())).tasks
        self.set_task(previous[-1] if previous else None)
        covs = self._covariances(batches, "begin_task")
        mems = [DualGPM.from_layer(layer) for layer in self.layers.values()]
        rep = self._representatives(covs, mems)
        own = [i for i in range(len(rep)) if rep[i] == i]
        projected = dict(zip(own, project_all([mems[i] for i in own], [covs[i] for i in own], self.grouped)))
        rows = {i: design_rows(projected[i], mems[i], self.config.r, self.config.scale) for i in own}
        got = {i: int(rows[i].any(1).sum()) for i in own}
        for i, layer in enumerate(self.layers.values()):
            layer.add_task(name, rows[rep[i]])
            layer.set_task(name)
        _warn_short(name, self.layers, {n: got[rep[i]] for i, n in enumerate(self.layers)}, self.config.r)

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> InfLoRAReport:
        self.set_task(name)
        layer0 = next(iter(self.layers.values()))
        eps = self.config.threshold_at(layer0.tasks.index(name))
        covs = self._covariances(batches, "end_task")
        mems = [DualGPM.from_layer(layer) for layer in self.layers.values()]
        rep = self._representatives(covs, mems)
        own = [i for i in range(len(rep)) if rep[i] == i]
        res = project_all([mems[i] for i in own], [covs[i] for i in own], self.grouped)
        if self.config.energy == "data":
            res = project_all([mems[i] for i in own], [x.t() for x in res], self.grouped)
        updates = {}
        for i, r in zip(own, res):
            first = mems[i].basis.shape[1] == 0 and not mems[i].retain
            updates[i] = mems[i].update(covs[i], eps, self.config.energy, None if first else r)
        report = InfLoRAReport(after=name, threshold=eps, r=self.config.r)
        stab = self.config.stability
        for i, (lname, layer) in enumerate(self.layers.items()):
            report.layers[lname] = updates[rep[i]]
            report.directions[lname] = int(layer.lora_B[name].detach().any(1).sum())
            mems[rep[i]].to_layer(layer)
            layer.finish_task()
            if stab is not None and stab.merge:
                taken = [0]

                def combine(prev: Tensor, new: Tensor, taken=taken) -> Tensor:
                    merged = magnitude_merge(prev, new)
                    taken[0] += int((merged != prev).sum())
                    return merged

                layer.fold(combine)
                report.replaced[lname] = taken[0] / max(layer.adapted_out * layer.in_features, 1)
            elif self.config.fold or stab is not None:
                layer.fold()
        return report

    def extra_loss(self) -> Tensor:
        """With ``stability``: ``lam · Σ_layers stability_loss(B_t, A_t, history, alpha)`` (PS-LoRA's
        loss on the trained ``A_t``), 0-dim fp32; else 0."""
        stab = self.config.stability
        if stab is None or stab.lam == 0.0:
            return super().extra_loss()
        total = None
        for layer in self.layers.values():
            term = layer.stability_loss(stab.alpha).float()
            total = term if total is None else total + term.to(total.device)
        return stab.lam * total


__all__ = [
    "DualGPM",
    "GPMUpdate",
    "InfLoRAConfig",
    "InfLoRAMethod",
    "InfLoRAReport",
    "InfLoRASaturationWarning",
    "design_rows",
    "input_covariances",
    "project_all",
]
