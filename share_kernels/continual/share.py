"""Share: build the shared subspace, train a task in it, and consolidate after the task.

Per layer (:class:`~share_kernels.nn.ShareLinear`), with every task's update
``dW_t = scale * B_t A_tᵀ``, ``A_t = U eps_a_t`` (d_in, p), ``B_t = V eps_b_t`` (d_out, p):

1. Building: from LoRA factors (``U`` = top-k left singular vectors of ``[A_1ᵀ ... A_nᵀ]``, ``V``
   those of ``[B_1 ... B_n]``), or from the first task, trained as a rank-r LoRA and then
   consolidated (step 3) on its own.
2. A later task starts from the previous task's coefficients and also trains φ temporary
   directions per factor (``ShareLinear.expand``), so it can leave the subspace.
3. Consolidation: stack every task's effective factors (the new task's temporary directions
   included), SVD, keep the top k as the new ``U``, ``V`` and re-express each task by projection,
   ``eps_a ← Uᵀ A_t``, ``eps_b ← Vᵀ B_t``. When k exceeds the rank of the stack, the basis is padded
   with orthonormal directions, taken from the previous basis first. Per task and layer the
   relative change ``‖dW_new − dW_old‖_F / ‖dW_old‖_F`` is recorded (:class:`ConsolidationReport`).

k is fixed, or an explained-energy threshold: the smallest k whose cumulative σ² fraction reaches
the threshold, taken for ``A`` and ``B`` separately and the larger kept, capped at ``max_k``. All
subspace algebra runs in float64; stacks are handled through thin QRs, never as d x (tasks·p)
products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.share_linear import ShareLinear, random_orthonormal
from .method import Method, ParamCounts, register_method
from .wrap import model_method

# Singular values below this fraction of the largest are treated as zero (rank detection).
_RANK_RTOL = 1e-10


@dataclass
class ShareConfig:
    """Share's options.

    Args:
        k: subspace size per layer, an int; or an explained-energy threshold in (0, 1], given as a
            float or a string with a decimal point (``0.6`` or ``"0.6"``): see the module doc.
        p: pseudo-rank, the columns of a task's coefficient matrices (k x p).
        phi: temporary directions per factor while a task trains (0: coefficients only).
        r: rank of the LoRA that the first task trains as when no subspace was given; also the
            LoRA rank ``adapter_stats`` compares with.
        scale: multiplies every update, ``dW = scale * V eps_b eps_aᵀ Uᵀ``.
        max_k: cap on k under an energy threshold (the layers are built for at most this k).
        merge: False keeps U and V once built: a new task is projected into the subspace (its
            temporary directions are not opened), old tasks and the shared bases stay
            bit-identical, so a new task ships as one task file.
    """

    k: Union[int, float, str] = 32
    p: int = 8
    phi: int = 2
    r: int = 8
    scale: float = 1.0
    max_k: int = 64
    merge: bool = True

    def __post_init__(self):
        k = self.k
        if isinstance(k, str):
            try:
                k = float(k) if any(c in k for c in ".eE") else int(k)
            except ValueError:
                raise ValueError(
                    f"ShareConfig.k: expected an int or an energy threshold like '0.6'; got {self.k!r}"
                ) from None
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"ShareConfig.k: expected an int or an energy threshold like '0.6'; got {self.k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"ShareConfig.k must be >= 1; got {k}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(f"ShareConfig.k as an energy threshold must lie in (0, 1]; got {k}")
        self.k = k
        for name, lo in (("p", 1), ("phi", 0), ("r", 1), ("max_k", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"ShareConfig.{name} must be an int >= {lo}; got {v!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"ShareConfig.scale must be a finite number; got {self.scale!r}")
        self.scale = float(self.scale)
        if not isinstance(self.merge, bool):
            raise ValueError(f"ShareConfig.merge must be a bool; got {self.merge!r}")

    @property
    def energy(self) -> Optional[float]:
        """The explained-energy threshold, or None for a fixed k."""
        return self.k if isinstance(self.k, float) else None

    @property
    def layer_k(self) -> int:
        """The most columns a layer's bases may get."""
        return self.max_k if isinstance(self.k, float) else self.k


@dataclass
class ConsolidationReport:
    """What one consolidation cost: ``change[task][layer] = ‖dW_new − dW_old‖_F / ‖dW_old‖_F``.

    ``after`` is the task whose end triggered it; its own entry is the part of what it learned
    outside the kept subspace (temporary directions, or LoRA rank beyond p). ``k`` is each
    layer's subspace size afterwards.
    """

    after: str
    k: dict[str, int]
    change: dict[str, dict[str, float]]

    def max_change(self) -> dict[str, float]:
        """Per task, the largest relative change over layers."""
        return {t: max(per_layer.values(), default=0.0) for t, per_layer in self.change.items()}

    def __str__(self) -> str:
        ks = sorted(set(self.k.values()))
        lines = [
            f"consolidation after {self.after!r}: k = {ks[0] if len(ks) == 1 else ks}",
            "task  max rel. change of dW",
        ]
        lines += [f"{t}  {c:.3g}" for t, c in self.max_change().items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------- subspace algebra


def _principal_directions(W: Tensor, E: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Left singular vectors of ``W E`` with nonzero σ, and all σ; W (d, m), E (m, n), float64.

    ``W E = Q (R E)``, so only the small ``R E`` is decomposed.
    """
    Q, R = torch.linalg.qr(W)
    P, S, _ = torch.linalg.svd(R if E is None else R @ E, full_matrices=False)
    rank = int((S > S[0] * _RANK_RTOL).sum()) if S.numel() and S[0] > 0 else 0
    return Q @ P[:, :rank], S


def _energy_k(S: Tensor, threshold: float) -> int:
    """Smallest k whose cumulative σ² fraction reaches ``threshold`` (0 when all σ are 0)."""
    e = S.square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    frac = torch.cumsum(e, 0) / total
    return int((frac < threshold - 1e-12).sum()) + 1


def _complete_basis(Q: Tensor, k: int, prefer: Tensor) -> Tensor:
    """``Q`` (d, r) orthonormal, cut or padded to k columns; padding comes from the span of
    ``prefer``'s columns first (outside Q), then at random."""
    if Q.shape[1] >= k:
        return Q[:, :k]
    rest = prefer - Q @ (Q.t() @ prefer)
    # QR in the preferred columns' order, not an SVD: ``rest`` is often nearly isotropic (old
    # orthonormal directions), and an SVD's basis of a near-degenerate spectrum turns with
    # rounding, so two runs that differ only in rounding would pad with different directions.
    P, R = torch.linalg.qr(rest)
    P = P[:, R.diagonal().abs() > 1e-6]
    P = P - Q @ (Q.t() @ P)  # re-orthogonalize: the residual carries Q's rounding
    P = torch.linalg.qr(P).Q if P.shape[1] else P
    Q = torch.cat([Q, P[:, : k - Q.shape[1]]], 1)
    if Q.shape[1] < k:
        Q = torch.cat([Q, random_orthonormal(Q.shape[0], k - Q.shape[1], against=Q, like=Q)], 1)
    return Q


def _express(A: Tensor, B: Tensor, U: Tensor, V: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Coefficients (k, p) of the update ``B Aᵀ`` in the bases: least squares, ``Uᵀ A`` and
    ``Vᵀ B``; with more than p columns, the best rank-p split of the k x k core instead."""
    a, b = U.t() @ A, V.t() @ B
    r = a.shape[1]
    if r <= p:
        return torch.nn.functional.pad(a, (0, p - r)), torch.nn.functional.pad(b, (0, p - r))
    P, S, Qh = torch.linalg.svd(a @ b.t())
    m = min(p, S.shape[0])  # the core is k x k: with k < p, pad the last p - k columns with zeros
    root = S[:m].sqrt()
    pad = (0, p - m)
    return torch.nn.functional.pad(P[:, :m] * root, pad), torch.nn.functional.pad(Qh[:m].t() * root, pad)


def _relative_change(A0: Tensor, B0: Tensor, A1: Tensor, B1: Tensor) -> float:
    """``‖B0 A0ᵀ − B1 A1ᵀ‖_F / ‖B0 A0ᵀ‖_F`` (0 when both are 0) through thin QRs of [A0, A1]
    and [B0, B1], without forming d_out x d_in matrices and without cancellation."""
    ra = torch.linalg.qr(torch.cat([A0, A1], 1), mode="r").R
    rb = torch.linalg.qr(torch.cat([B0, B1], 1), mode="r").R
    n0 = A0.shape[1]
    old = rb[:, :n0] @ ra[:, :n0].t()
    diff = old - rb[:, n0:] @ ra[:, n0:].t()
    den = float(torch.linalg.matrix_norm(old))
    num = float(torch.linalg.matrix_norm(diff))
    return num / den if den > 0 else num


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _choose_k(k: Union[int, float], SA: Tensor, SB: Tensor, cap: int) -> int:
    if isinstance(k, float):
        k = max(_energy_k(SA, k), _energy_k(SB, k))
    return max(1, min(k, cap))


# --------------------------------------------------------------- float64 state of 16/32-bit layers

#: attribute of a ShareLinear holding its float64 consolidation state (not saved, not in the
#: state_dict): ``{"U", "V": (d, k), "eps": {task: (eps_a, eps_b)}}``
_MASTER = "_share_consolidation_master"


def _master_or_live(master: Optional[Tensor], live: Tensor) -> Tensor:
    """``master`` (float64) when ``live`` is still exactly its rounding (nothing changed the
    live tensor since: no training step, no load), else ``live`` in float64."""
    if master is not None and master.shape == live.shape:
        master = master.to(live.device)
        if torch.equal(master.to(live.dtype), live.detach()):
            return master
    return _f64(live)


def _coordinates64(layer: ShareLinear) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """:meth:`ShareLinear.coordinates` in float64, with the float64 state of the last
    consolidation in place of the rounded U, V and coefficients that have not changed since.

    A bf16 / fp16 / fp32 layer stores U, V and the coefficients rounded; consolidating from the
    rounded values would round every task again at every consolidation (a random walk: 500
    consolidations of a bf16 model moved an early task's dW by 6%). From the float64 state, a
    task's stored dW stays within one rounding of its float64 value however often it is merged.
    """
    WA, WB, coords = layer.coordinates()
    WA, WB = _f64(WA), _f64(WB)
    coords = {t: (_f64(Ea), _f64(Eb)) for t, (Ea, Eb) in coords.items()}
    master = getattr(layer, _MASTER, None)
    if master is None or layer.U.dtype == torch.float64:
        return WA, WB, coords
    k = layer.k
    WA[:, :k] = _master_or_live(master["U"], layer.U)
    WB[:, :k] = _master_or_live(master["V"], layer.V)
    for t, (Ea, Eb) in coords.items():
        if t in master["eps"] and t in layer.eps_a and not (t == layer.training_task and layer.lora_A is not None):
            ea, eb = master["eps"][t]
            Ea[:k] = _master_or_live(ea, layer.eps_a[t])
            Eb[:k] = _master_or_live(eb, layer.eps_b[t])
    return WA, WB, coords


def _keep_master(layer: ShareLinear, U: Tensor, V: Tensor, coefficients: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Record the float64 state that ``layer``'s rounded U, V and coefficients came from."""
    if layer.U.dtype == torch.float64:
        return
    old = getattr(layer, _MASTER, None) or {"eps": {}}
    eps = {t: coefficients.get(t, old["eps"].get(t)) for t in layer.tasks}
    layer.__dict__[_MASTER] = {"U": U, "V": V, "eps": {t: e for t, e in eps.items() if e is not None}}


@torch.no_grad()
def consolidate_layer(layer: ShareLinear, k: Union[int, float], keep_subspace: bool = False) -> dict[str, float]:
    """Merge the training task into ``layer``'s subspace and re-express every task (step 3).

    ``k``: int, or an energy threshold (float). ``keep_subspace`` (only once a subspace is
    built): keep U, V, project only the training task, leave the others bit-identical.
    Returns ``{task: ‖dW_new − dW_old‖_F / ‖dW_old‖_F}``, measured after the cast back to the
    layer's dtype.
    """
    tasks = layer.tasks
    if not tasks:
        return {}
    WA, WB, coords = _coordinates64(layer)
    old = {t: (WA @ Ea, WB @ Eb) for t, (Ea, Eb) in coords.items()}
    k_old = layer.k
    if keep_subspace and layer.subspace_built:
        U, V = WA[:, :k_old], WB[:, :k_old]
        moved = [layer.training_task] if layer.training_task is not None else []
    else:
        QA, SA = _principal_directions(WA, torch.cat([Ea for Ea, _ in coords.values()], 1))
        QB, SB = _principal_directions(WB, torch.cat([Eb for _, Eb in coords.values()], 1))
        kk = _choose_k(k, SA, SB, layer.max_k)
        U = _complete_basis(QA, kk, WA[:, :k_old])
        V = _complete_basis(QB, kk, WB[:, :k_old])
        moved = tasks
    dtype = layer.U.dtype
    coefficients = {t: (layer.eps_a[t], layer.eps_b[t]) for t in tasks if t not in moved}
    exact = {t: _express(*old[t], U, V, layer.p) for t in moved}
    for t, (ea, eb) in exact.items():
        coefficients[t] = (ea.to(dtype), eb.to(dtype))
    U_low, V_low = U.to(dtype), V.to(dtype)
    changes = {}
    for t in tasks:
        ea, eb = coefficients[t]
        if t in moved:
            changes[t] = _relative_change(*old[t], _f64(U_low) @ _f64(ea), _f64(V_low) @ _f64(eb))
        else:
            changes[t] = 0.0
    layer.set_subspace(U_low, V_low, coefficients)
    _keep_master(layer, U, V, exact)
    return changes


def consolidate(
    layers: Mapping[str, ShareLinear], after: str, k: Union[int, float] = 32, keep_subspace: bool = False
) -> ConsolidationReport:
    """:func:`consolidate_layer` on every layer; the report of what it cost each task."""
    change: dict[str, dict[str, float]] = {}
    for lname, layer in layers.items():
        for t, c in consolidate_layer(layer, k, keep_subspace).items():
            change.setdefault(t, {})[lname] = c
    return ConsolidationReport(after=after, k={n: layer.k for n, layer in layers.items()}, change=change)


def _check_lora_factors(layer: ShareLinear, factors: Sequence[tuple[Tensor, Tensor]]) -> None:
    if layer.tasks:
        raise ValueError(f"build_subspace_from_lora needs a layer without tasks; it has {layer.tasks}")
    if not factors:
        raise ValueError("build_subspace_from_lora: no LoRA factors given")
    if not isinstance(factors, (list, tuple)):
        raise TypeError(
            f"build_subspace_from_lora: factors must be a list of (A, B) pairs; got {type(factors).__name__}"
        )
    for i, pair in enumerate(factors):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
            raise TypeError(f"LoRA factors #{i}: expected a pair of tensors (A, B); got {type(pair).__name__}")
        A, B = pair
        for name, t in (("A", A), ("B", B)):
            if not t.is_floating_point():
                raise TypeError(f"LoRA factors #{i}: {name} must be floating point; got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"LoRA factors #{i}: {name} holds NaN or infinite values")
        r = A.shape[0] if A.dim() == 2 else -1
        if A.shape != (r, layer.in_features) or B.shape != (layer.out_features, r):
            raise ValueError(
                f"LoRA factors #{i}: expected A (r, d_in={layer.in_features}) and B (d_out={layer.out_features}, r); "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )


@torch.no_grad()
def build_subspace_from_lora(
    layer: ShareLinear, factors: Sequence[tuple[Tensor, Tensor]], k: Union[int, float, None] = None
) -> None:
    """Set ``layer``'s U, V from existing LoRA adapters ``[(A, B), ...]``, A (r_i, d_in),
    B (d_out, r_i) as peft stores them (step 1); the layer must have no tasks yet.

    ``U`` = top-k left singular vectors of ``[A_1ᵀ ... A_nᵀ]``, ``V`` of ``[B_1 ... B_n]``,
    padded with orthonormal directions when k exceeds their rank. ``k`` as in
    :class:`ShareConfig` (default: the layer's ``max_k``).
    """
    _check_lora_factors(layer, factors)
    QA, SA = _principal_directions(torch.cat([_f64(A).t() for A, _ in factors], 1))
    QB, SB = _principal_directions(torch.cat([_f64(B) for _, B in factors], 1))
    kk = _choose_k(layer.max_k if k is None else k, SA, SB, layer.max_k)
    U = _complete_basis(QA, kk, _f64(layer.U))
    V = _complete_basis(QB, kk, _f64(layer.V))
    layer.set_subspace(U, V, {})


def init_subspace_from_lora(model: nn.Module, factors: Mapping[str, Sequence[tuple[Tensor, Tensor]]]) -> None:
    """:func:`build_subspace_from_lora` on every Share layer of a wrapped model, with the
    model's config k; ``factors`` maps each layer name to its LoRA adapters ``[(A, B), ...]``."""
    method, config, layers = model_method(model)
    if method is not ShareMethod:
        raise ValueError(f"init_subspace_from_lora needs a model wrapped with 'share'; it has {method.name!r}")
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise ValueError(f"factors must name every Share layer exactly; missing {missing}, not Share layers {extra}")
    for name, layer in layers.items():  # every layer is checked before any changes
        try:
            _check_lora_factors(layer, factors[name])
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    for name, layer in layers.items():
        build_subspace_from_lora(layer, factors[name], config.k)


@register_method
class ShareMethod(Method):
    """Share behind :class:`~share_kernels.continual.ContinualLearner` (``method="share"``).

    ``begin_task``: the first task trains as a rank-r LoRA when no subspace exists; a later task
    starts from the previous task's coefficients and opens φ temporary directions.
    ``end_task``: consolidation, returning a :class:`ConsolidationReport`. ``extra_loss`` is 0.
    """

    name = "share"
    layer_cls = ShareLinear
    config_cls = ShareConfig

    def __init__(self, layers: dict[str, ShareLinear], config: ShareConfig):
        super().__init__(layers, config)
        self.check_layers_match({"p": "p", "scale": "scale"})

    @classmethod
    def layer_kwargs(cls, config: ShareConfig) -> dict:
        return {"k": config.layer_k, "p": config.p, "scale": config.scale}

    @classmethod
    def param_counts(
        cls, d_in: int, d_out: int, config: ShareConfig, layer: Optional[ShareLinear] = None
    ) -> ParamCounts:
        """Per task: ``2kp`` coefficients stored; trained are those plus φ temporary directions
        per factor with their coefficients, ``φ (d_in + d_out + 2p)``. Shared: ``k (d_in + d_out)``."""
        k = layer.k if layer is not None else min(config.layer_k, d_in, d_out)
        p = layer.p if layer is not None else config.p
        phi = max(0, min(config.phi, d_in - k, d_out - k)) if config.merge else 0
        return ParamCounts(2 * k * p + phi * (d_in + d_out + 2 * p), 2 * k * p, k * (d_in + d_out))

    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        first = not any(layer.subspace_built or layer.tasks for layer in self.layers.values())
        for layer in self.layers.values():
            layer.add_task(name, lora_rank=self.config.r if first else None)
            layer.set_task(name)
            if not first and self.config.merge:
                layer.expand(self.config.phi)

    def end_task(self, name: str, batches: Optional[Iterable] = None) -> ConsolidationReport:
        return consolidate(self.layers, after=name, k=self.config.k, keep_subspace=not self.config.merge)


__all__ = [
    "ShareConfig",
    "ShareMethod",
    "ConsolidationReport",
    "consolidate",
    "consolidate_layer",
    "build_subspace_from_lora",
    "init_subspace_from_lora",
]
