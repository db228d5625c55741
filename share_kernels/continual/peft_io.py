"""Compress many HF peft LoRA adapters into one Share model, and export a task back to peft.

Reading (:func:`read_peft_adapter`): an adapter directory as ``peft.PeftModel.save_pretrained``
writes it: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or the legacy
``adapter_model.bin``, read only through ``torch.load(weights_only=True)``). Keys are
``base_model.model.<module path>.lora_A[.<adapter>].weight`` (r, d_in) and ``...lora_B...`` (d_out, r);
peft's scaling ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), per layer from
``rank_pattern`` / ``alpha_pattern`` when given, is folded into the factors.

Building (:func:`from_peft_adapters`), per adapted layer, with adapter i's update
``dW_i = s_i B_i A_i`` (d_out, d_in), all in float64:

1. balanced factors: ``dW_i = B̃_i Ã_iᵀ`` with ``Ã_i = Q_A Qᵀ √S``, ``B̃_i = Q_B P √S`` from thin QRs
   ``A_iᵀ = Q_A R_A``, ``B_i = Q_B R_B`` and the SVD ``s_i R_B R_Aᵀ = P S Qᵀ`` (so the subspace does
   not depend on how training split the update between A and B);
2. ``U`` = top-k left singular vectors of ``[Ã_1 ... Ã_n]`` (d_in, Σr), ``V`` of ``[B̃_1 ... B̃_n]``;
   k an int (capped at the stacked rank and at ``min(d_in, d_out)``) or an explained-energy
   threshold (a float in (0, 1]: the smallest k reaching it, for U and V, the larger kept);
3. ``eps_a_i = Uᵀ Ã_i``, ``eps_b_i = Vᵀ B̃_i`` (k, r_i), zero-padded to p columns (exact), or the
   best rank-p split of the k x k core when r_i > p. ``V Vᵀ dW_i U Uᵀ`` is the closest update in
   the subspace, so the result equals every ``dW_i`` to float rounding once k covers the stacked
   rank.

Exporting (:func:`to_peft_adapter`): ``lora_A = (U eps_a)ᵀ`` (p, d_in), ``lora_B = scale · V eps_b``
(d_out, p), written with ``lora_alpha = r = p`` so peft's scaling is 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from torch import Tensor

from ..nn.common import check_task_name, is_adaptable, is_conv1d
from ..nn.share_linear import ShareLinear
from .io import _save_tensors, atomic_write
from .share import _complete_basis, _energy_k, _f64, _principal_directions, _relative_change
from .wrap import adapter_layers, wrap

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

#: model attribute where :func:`from_peft_adapters` records each task's source adapter
#: (``base_model_name_or_path``, ``task_type``, ``path``); :func:`to_peft_adapter` reads it.
SOURCES_ATTR = "peft_sources"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# LoraConfig options that change the forward beyond ``s B A`` (or the layer kind) and that Share
# cannot represent: option -> its no-op values.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (None, False),
}
# init_lora_weights values whose adapters only mean something on a rewritten (residual) base.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_WHY = {
    "modules_to_save": "it also saves full copies of modules, which are not low-rank",
    "trainable_token_indices": "it also trains embedding rows, which are not low-rank",
    "bias": "it trains biases, which are not low-rank",
    "lora_bias": "its lora_B carries a bias",
    "use_dora": "DoRA rescales the weight's columns, which is not a low-rank update",
}


class _Weights:
    """The tensors of ``adapter_model.safetensors`` (read one at a time, memory-mapped) or of a
    legacy ``adapter_model.bin`` (``torch.load(weights_only=True)``, memory-mapped when the file
    is in torch's zip format), so that hundreds of adapters are never all in memory."""

    def __init__(self, path: str):
        self.path = path
        self._dict: Optional[dict[str, Tensor]] = None
        if path.endswith(".bin"):
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # the pre-zip format cannot be mapped
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # an unpickler refusal, a truncated file
                raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise ValueError(f"{path}: expected a dict of tensors")
            self._dict = sd

    def keys(self) -> list[str]:
        if self._dict is not None:
            return list(self._dict)
        with _readable(self.path):
            with safe_open(self.path, framework="pt") as f:
                return list(f.keys())

    def get(self, keys: Sequence[str]) -> list[Tensor]:
        if self._dict is not None:
            return [self._dict[k].clone() for k in keys]
        # clone: safe_open's tensors are views of the mapped file (a rewrite would change them,
        # a truncation would kill the process)
        with _readable(self.path):
            with safe_open(self.path, framework="pt") as f:
                return [f.get_tensor(k).clone() for k in keys]


class _readable:
    """Turns any error of reading an adapter's weights (safetensors' ``SafetensorError`` for a
    damaged header, an OSError) into a ValueError naming the file."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is not None and not isinstance(err, ValueError) and isinstance(err, Exception):
            raise ValueError(f"{self.path}: cannot be read as safetensors ({type(err).__name__}: {err})") from None
        return False


def _check_config_values(cfg: dict, cfg_path: str) -> None:
    """Types and values of the numbers and patterns peft's config gives: finite positive
    ``r`` / ``lora_alpha`` (a NaN passes ``<= 0``), ``rank_pattern`` / ``alpha_pattern`` as
    objects of valid regexes to finite positive numbers; ValueError naming the file."""
    for opt in ("r", "lora_alpha"):
        v = cfg.get(opt)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{cfg_path}: {opt} must be a finite positive number; got {v!r}")
    for opt in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(opt)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ValueError(f"{cfg_path}: {opt} must be an object {{regex: number}}; got {type(pattern).__name__}")
        for key, v in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise ValueError(f"{cfg_path}: {opt} key {key!r} is not a valid regex ({e})") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{cfg_path}: {opt}[{key!r}] must be a finite positive number; got {v!r}")
    if cfg.get("rank_pattern") and any(not float(v).is_integer() for v in cfg["rank_pattern"].values()):
        raise ValueError(f"{cfg_path}: rank_pattern values must be whole numbers; got {cfg['rank_pattern']}")


def _check_factor_pair(wfile: str, layer: str, A: Tensor, B: Tensor) -> None:
    """What can be checked of a peft adapter's factors without a digest (peft writes none):
    2-D shapes that chain, a floating dtype, finite values; ValueError / TypeError naming the
    file, layer and tensor."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{wfile}: layer {layer!r}: expected lora_A (r, d_in) and lora_B (d_out, r) (a linear layer); got "
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}"
        )
    for name, t in (("lora_A", A), ("lora_B", B)):
        if not t.is_floating_point():
            raise TypeError(f"{wfile}: layer {layer!r}: {name} must be floating point; got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{wfile}: layer {layer!r}: {name} holds NaN or infinite values")


@dataclass
class PeftLora:
    """One peft LoRA adapter as read from its directory (its tensors stay on disk).

    ``shapes[layer] = (r, d_in, d_out)``; :meth:`factors` loads ``(A (r, d_in), B (d_out, r))``
    as stored; ``scaling[layer]`` is peft's ``lora_alpha / r`` (or ``/ √r``): the update is
    ``dW = scaling · B A``.
    """

    name: str
    path: str
    config: dict
    shapes: dict[str, tuple[int, int, int]]
    scaling: dict[str, float]
    keys: dict[str, tuple[str, str]]
    weights: _Weights
    files: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    @property
    def layers(self) -> list[str]:
        return list(self.shapes)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the files read (config and weights)."""
        return sum(os.path.getsize(f) for f in self.files)

    def rank(self, layer: str) -> int:
        return self.shapes[layer][0]

    def shape(self, layer: str) -> tuple[int, int]:
        """(d_in, d_out) of a layer."""
        return self.shapes[layer][1:]

    def factors(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(A (r, d_in), B (d_out, r))`` of a layer, as stored (scaling not applied); checked
        again as they are read (the file may have changed since :func:`read_peft_adapter`)."""
        A, B = self.weights.get(self.keys[layer])
        _check_factor_pair(self.weights.path, layer, A, B)
        if (A.shape[0], A.shape[1], B.shape[0]) != self.shapes[layer]:
            raise ValueError(
                f"{self.weights.path}: layer {layer!r}: the factors' shapes changed since the adapter was read "
                f"(r, d_in, d_out) {self.shapes[layer]} -> {(A.shape[0], A.shape[1], B.shape[0])}"
            )
        return A, B


def _pattern_value(pattern: Mapping[str, object], layer: str, default):
    """peft's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching the layer name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise ValueError(f"peft adapter {path!r}: not a directory")
    if not os.path.exists(cfg_path):
        raise ValueError(f"peft adapter {path!r}: no {CONFIG_NAME} (not a directory written by peft's save_pretrained)")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object; got {type(cfg).__name__}")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"peft adapter {path!r} is of peft_type {kind!r}; only LoRA adapters (peft_type 'LORA') can be "
            "compressed into a Share subspace"
        )
    for opt, noop in _UNSUPPORTED.items():
        v = cfg.get(opt)
        if v not in noop:
            why = _WHY.get(opt, "Share represents only the low-rank update s·B·A of nn.Linear layers")
            raise ValueError(f"peft adapter {path!r}: {opt}={v!r} is not supported: {why}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"peft adapter {path!r}: init_lora_weights={init!r} is not supported: such an adapter is relative "
            "to a base weight that peft rewrites on load (W minus the initial s·B·A), so adding s·B·A to the "
            "original base would be wrong. Convert it to a plain LoRA first: save it with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the saved initial adapter>)"
        )
    for opt in ("r", "lora_alpha"):
        v = cfg.get(opt)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{cfg_path}: {opt} must be a positive number; got {v!r}")
    return cfg


def _weights_file(path: str) -> str:
    st, binf = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, BIN_NAME)
    if os.path.exists(st):
        return st
    if os.path.exists(binf):
        return binf
    raise ValueError(f"peft adapter {path!r}: neither {SAFETENSORS_NAME} nor {BIN_NAME} is present")


def read_peft_adapter(path: str, name: Optional[str] = None) -> PeftLora:
    """Read and check one peft LoRA adapter directory; ``name`` defaults to its basename.

    ValueError for a non-LoRA peft type, options Share cannot represent (DoRA, biases,
    ``modules_to_save``, ``fan_in_fan_out``, ...), tensors that are not LoRA factors, factors
    whose ranks disagree with each other or with the config's ``r`` / ``rank_pattern``, and NaN
    or infinite values. Each tensor is loaded once for the checks and dropped; :meth:`PeftLora.factors`
    loads a layer's again when it is needed.
    """
    path = os.fspath(path)
    cfg = _read_config(path)
    _check_config_values(cfg, os.path.join(path, CONFIG_NAME))
    wfile = _weights_file(path)
    weights = _Weights(wfile)
    parts: dict[str, dict[str, str]] = {}
    unexpected = []
    for key in weights.keys():
        m = _KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        slot = parts.setdefault(m["path"], {})
        if m["ab"] in slot:
            raise ValueError(f"{wfile}: layer {m['path']!r} has lora_{m['ab']} twice (several adapters in one file)")
        slot[m["ab"]] = key
    if unexpected:
        raise ValueError(
            f"{wfile}: tensors that are not LoRA factors of linear layers: {sorted(unexpected)[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}; only '<module>.lora_A.weight' / '<module>.lora_B.weight' "
            "can be compressed"
        )
    if not parts:
        raise ValueError(f"{wfile}: holds no LoRA factors")
    shapes, scaling, keys = {}, {}, {}
    for layer, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{wfile}: layer {layer!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        keys[layer] = (ab["A"], ab["B"])
        A, B = weights.get(keys[layer])
        _check_factor_pair(wfile, layer, A, B)
        r = _pattern_value(cfg.get("rank_pattern"), layer, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), layer, cfg["lora_alpha"])
        if A.shape[0] != r:
            raise ValueError(
                f"{wfile}: layer {layer!r} has rank {A.shape[0]} but the config gives r={r} (r / rank_pattern)"
            )
        scaling[layer] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        shapes[layer] = (A.shape[0], A.shape[1], B.shape[0])
    return PeftLora(
        name=os.path.basename(os.path.normpath(path)) if name is None else name,
        path=path,
        config=cfg,
        shapes=shapes,
        scaling=scaling,
        keys=keys,
        weights=weights,
        files=[os.path.join(path, CONFIG_NAME), wfile],
    )


def check_compatible(adapters: Sequence[PeftLora]) -> dict[str, tuple[int, int]]:
    """Check that the adapters can share subspaces; returns ``{layer: (d_in, d_out)}``.

    ValueError when they name different base models (``base_model_name_or_path``, compared by
    its last path component, so ``org/model`` and ``/local/model`` agree), adapt different
    layers, or disagree on a layer's shape.
    """
    if not adapters:
        raise ValueError("no peft adapters given")
    first = adapters[0]
    bases = {a.name: a.base_model for a in adapters if a.base_model}
    # a hub id "org/name" and a local copy ".../name" are one model: compare the last component
    if len({os.path.basename(os.path.normpath(b)).lower() for b in bases.values()}) > 1:
        raise ValueError(
            f"the adapters were trained on different base models (base_model_name_or_path): {bases}; a shared "
            "subspace only makes sense for adapters of one base model (if these name the same model, make "
            "base_model_name_or_path agree in their adapter_config.json)"
        )
    layers = first.layers
    for a in adapters[1:]:
        if set(a.layers) != set(layers):
            only_first = sorted(set(layers) - set(a.layers))[:4]
            only_a = sorted(set(a.layers) - set(layers))[:4]
            raise ValueError(
                f"adapters {first.name!r} and {a.name!r} adapt different layers (target modules): only in "
                f"{first.name!r}: {only_first}, only in {a.name!r}: {only_a}; compress adapters with the same "
                "target modules together"
            )
    shapes = {n: first.shape(n) for n in layers}
    for a in adapters[1:]:
        for n in layers:
            if a.shape(n) != shapes[n]:
                raise ValueError(
                    f"layer {n!r}: adapter {first.name!r} has (d_in, d_out) = {shapes[n]}, {a.name!r} has "
                    f"{a.shape(n)}: the adapters belong to different base models"
                )
    names = [a.name for a in adapters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"several adapters are named {dup}; pass a mapping {{name: path}} to name them apart")
    return shapes


# ------------------------------------------------------------------------- the subspace per layer


def balanced_factors(A: Tensor, B: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``(Ã (d_in, m), B̃ (d_out, m))`` in float64 with ``B̃ Ãᵀ = scaling · B A`` and ``Ãᵀ Ã = B̃ᵀ B̃``
    diagonal (the update's SVD with √σ on each side); A (r, d_in), B (d_out, r)."""
    Qa, Ra = torch.linalg.qr(_f64(A).t())
    Qb, Rb = torch.linalg.qr(_f64(B))
    P, S, Qh = torch.linalg.svd(scaling * (Rb @ Ra.t()), full_matrices=False)
    root = S.sqrt()
    return Qa @ (Qh.t() * root), Qb @ (P * root)


@dataclass
class LayerFit:
    """One layer's shared subspace and what it cost each adapter.

    ``k`` the size kept; ``rank_a``, ``rank_b`` the ranks of the stacked A and B factors, ``SA``,
    ``SB`` their singular values; ``error[adapter] = ‖dW − dŴ‖_F / ‖dW‖_F`` after the cast to
    the layer's dtype, ``norm[adapter] = ‖dW‖_F``; ``curve[adapter]``, when asked for, the
    ``(‖dW − dŴ_k‖_F², ‖dW‖_F²)`` for each k in ``curve_ks`` (float64, see :func:`error_rows`).
    """

    name: str
    k: int
    rank_a: int
    rank_b: int
    SA: Tensor
    SB: Tensor
    error: dict[str, float]
    norm: dict[str, float]
    curve_ks: list[int] = field(default_factory=list)
    curve: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @property
    def stacked_rank(self) -> int:
        return max(self.rank_a, self.rank_b)


def error_rows(X: Tensor, Y: Tensor, ks: Sequence[int], p: int, cap: int) -> list[tuple[float, float]]:
    """``(‖dW − dŴ_k‖_F², ‖dW‖_F²)`` for each k: ``dW = QB X Yᵀ QAᵀ`` with X (rank_B, r), Y (rank_A, r)
    its factors in the full principal bases, ``dŴ_k`` the best rank-p part of its projection on
    the first min(k, cap) directions of each. Through the r x r Gram matrices of the kept rows
    (cumulative sums of row outer products, all k at once): ``‖X_k Y_kᵀ‖_F² = Σ (X_kᵀX_k) ∘ (Y_kᵀY_k)``,
    and for r > p the σ² of ``X_k Y_kᵀ``, which are those of ``M_X M_Yᵀ`` with ``X_kᵀX_k = M_Xᵀ M_X``."""
    if X.shape[0] == 0 or Y.shape[0] == 0:
        return [(0.0, 0.0) for _ in ks]
    grams = []
    for Z in (X, Y):
        cum = torch.cumsum(Z[:, :, None] * Z[:, None, :], 0)  # (rows, r, r)
        idx = torch.tensor([min(k, cap, Z.shape[0]) - 1 for k in ks])
        grams.append((cum[idx], cum[-1]))
    (GX, GX_all), (GY, GY_all) = grams
    total = float((GX_all * GY_all).sum())
    if X.shape[1] <= p:
        kept = (GX * GY).sum((1, 2))
    else:
        ms = []
        for G in (GX, GY):
            lam, E = torch.linalg.eigh(G)
            ms.append(lam.clamp_min(0).sqrt()[:, :, None] * E.transpose(1, 2))
        kept = torch.linalg.svdvals(ms[0] @ ms[1].transpose(1, 2)).square()[:, :p].sum(1)
    return [(max(total - float(c), 0.0), total) for c in kept]


def coefficients(Ab: Tensor, Bb: Tensor, U: Tensor, V: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """``(eps_a, eps_b)`` (k, p) of the update ``Bb Abᵀ`` in the bases: ``Uᵀ Ab``, ``Vᵀ Bb``
    zero-padded to p columns; with more than p columns, the best rank-p split of the k x k core
    ``(Uᵀ Ab)(Vᵀ Bb)ᵀ`` (at most k columns carry anything)."""
    a, b = U.t() @ Ab, V.t() @ Bb
    if a.shape[1] > p:
        P, S, Qh = torch.linalg.svd(a @ b.t())
        m = min(p, S.numel())
        root = S[:m].sqrt()
        a, b = P[:, :m] * root, Qh[:m].t() * root
    pad = p - a.shape[1]
    return torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, pad))


def _choose_k(k: Union[int, float], SA: Tensor, SB: Tensor, rank: int, cap: int) -> int:
    if isinstance(k, float):
        k = max(_energy_k(SA, k), _energy_k(SB, k))
    return max(1, min(k, rank, cap))


@torch.no_grad()
def fit_layer(
    layer: ShareLinear,
    name: str,
    adapters: Sequence[PeftLora],
    k: Union[int, float],
    curve_ks: Optional[Sequence[int]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> LayerFit:
    """Build ``layer``'s U, V from the adapters' factors and install one task per adapter
    (steps 1-3 of the module doc); ``curve_ks``: also the error each k would give. The float64
    algebra runs on ``device`` (default: the layer's)."""
    dev = torch.device(device) if device is not None else layer.base_layer.weight.device
    balanced = {
        a.name: balanced_factors(*(t.to(dev) for t in a.factors(name)), a.scaling[name]) for a in adapters
    }
    QA, SA = _principal_directions(torch.cat([Ab for Ab, _ in balanced.values()], 1))
    QB, SB = _principal_directions(torch.cat([Bb for _, Bb in balanced.values()], 1))
    kk = _choose_k(k, SA, SB, max(QA.shape[1], QB.shape[1]), layer.max_k)
    U = _complete_basis(QA, kk, _f64(layer.U).to(dev))
    V = _complete_basis(QB, kk, _f64(layer.V).to(dev))
    coeffs = {t: coefficients(Ab, Bb, U, V, layer.p) for t, (Ab, Bb) in balanced.items()}
    for t in balanced:
        layer.add_task(t)
    layer.set_subspace(U, V, coeffs)
    error, norm, curve = {}, {}, {}
    for t, (Ab, Bb) in balanced.items():
        A1, B1 = layer.task_factors(t)
        error[t] = _relative_change(Ab, Bb, _f64(A1).to(dev), layer.scale * _f64(B1).to(dev))
        norm[t] = float(torch.linalg.vector_norm(Ab.square().sum(0)))  # Ã's column norms² are dW's σ
        if curve_ks:
            cap = min(layer.in_features, layer.out_features)
            curve[t] = error_rows(QB.t() @ Bb, QA.t() @ Ab, curve_ks, layer.p, cap)
    return LayerFit(name, kk, QA.shape[1], QB.shape[1], SA.cpu(), SB.cpu(), error, norm, list(curve_ks or []), curve)


def _as_named_paths(adapter_paths) -> dict[str, str]:
    if isinstance(adapter_paths, (str, os.PathLike)):
        raise TypeError("adapter_paths must be a list of adapter directories (or a {name: path} mapping), not one path")
    if isinstance(adapter_paths, Mapping):
        return {str(n): os.fspath(p) for n, p in adapter_paths.items()}
    paths = [os.fspath(p) for p in adapter_paths]
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"several adapter directories are named {dup}; name them apart: a mapping {{name: path}} in Python, "
            "NAME=DIR arguments on the command line"
        )
    return dict(zip(names, paths))


def read_peft_adapters(adapter_paths, progress: Optional[Callable] = None) -> list[PeftLora]:
    """Read the adapters (a list of directories, named after them, or ``{name: path}``) and check
    that they fit together (:func:`check_compatible`)."""
    named = _as_named_paths(adapter_paths)
    items = named.items() if progress is None else progress(named.items(), desc="reading adapters", unit="adapter")
    adapters = [read_peft_adapter(p, n) for n, p in items]
    check_compatible(adapters)
    return adapters


def _check_k_p(k, p):
    if isinstance(k, str):
        try:
            k = float(k) if any(c in k for c in ".eE") else int(k)
        except ValueError:
            raise ValueError(f"k: expected an int or an energy threshold like '0.99'; got {k!r}") from None
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k: expected an int or an energy threshold in (0, 1]; got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if isinstance(k, float) and not 0.0 < k <= 1.0:
        raise ValueError(f"k as an energy threshold must lie in (0, 1]; got {k}")
    if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
        raise ValueError(f"p must be a positive int or None; got {p!r}")
    return k


def _exact_names_regex(names: Sequence[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def check_model_layers(
    model: nn.Module, shapes: Mapping[str, tuple[int, int]], base_name: Optional[str] = None
) -> None:
    """ValueError unless every layer in ``shapes`` (``{name: (d_in, d_out)}``) is an ``nn.Linear``
    or a transformers ``Conv1D`` of ``model`` with that shape (``model`` may live on the meta device).
    peft stores a Conv1D's factors as a Linear's (lora_A (r, d_in), lora_B (d_out, r)); its
    ``fan_in_fan_out`` only says the base weight is stored transposed, which the layers read."""
    modules = dict(model.named_modules())
    missing = [n for n in shapes if n not in modules]
    if missing:
        raise ValueError(
            f"the adapters adapt layers the model does not have: {missing[:4]}; the model must be the one the "
            f"adapters were trained on (their base_model_name_or_path is {base_name!r}), of the class that was "
            "given to peft.get_peft_model"
        )
    for n, (d_in, d_out) in shapes.items():
        m = modules[n]
        if not is_adaptable(m):
            raise ValueError(
                f"layer {n!r} is a {type(m).__name__}, not an nn.Linear or Conv1D: Share wraps those only"
            )
        w_in, w_out = (m.weight.shape if is_conv1d(m) else m.weight.shape[::-1])
        if (w_in, w_out) != (d_in, d_out):
            raise ValueError(
                f"layer {n!r}: the adapters give (d_in, d_out) = {(d_in, d_out)}, the model's "
                f"{type(m).__name__} is ({w_in}, {w_out}): the adapters were trained on another base model"
            )


def ingest(
    model: nn.Module,
    adapters: Sequence[PeftLora],
    k: Union[int, float, str],
    p: Optional[int] = None,
    max_k: int = 64,
    progress: Optional[Callable] = None,
    curve_ks: Optional[Sequence[int]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> list[LayerFit]:
    """Wrap ``model``'s adapted layers with Share and install the adapters (see the module doc);
    returns each layer's :class:`LayerFit` (with the error each k in ``curve_ks`` would give).
    The model must not be wrapped yet. Adapters are loaded one layer at a time; the float64
    algebra runs on ``device`` (default: each layer's device)."""
    k = _check_k_p(k, p)
    shapes = check_compatible(adapters)
    if adapter_layers(model):
        raise ValueError("the model is already wrapped; from_peft_adapters needs the plain base model")
    check_model_layers(model, shapes, adapters[0].base_model)
    for a in adapters:
        try:
            check_task_name(a.name)
        except ValueError as e:
            raise ValueError(
                f"adapter {a.path!r}: {e}; name it: a mapping {{name: path}} in Python, NAME=DIR on the command line"
            ) from None
    rank = max(a.rank(n) for a in adapters for n in shapes)
    p = rank if p is None else p
    if isinstance(k, int) and k > max_k:
        max_k = k
    wrap(model, "share", _exact_names_regex(list(shapes)), k=k, p=p, r=rank, scale=1.0, max_k=max_k)
    layers = adapter_layers(model)
    names = list(shapes)
    it = names if progress is None else progress(names, desc="layers", unit="layer")
    fits = [fit_layer(layers[n], n, adapters, k, curve_ks, device) for n in it]
    setattr(
        model,
        SOURCES_ATTR,
        {
            a.name: {"base_model_name_or_path": a.base_model, "task_type": a.config.get("task_type"), "path": a.path}
            for a in adapters
        },
    )
    return fits


def from_peft_adapters(
    model: nn.Module,
    adapter_paths: Union[Sequence[str], Mapping[str, str]],
    k: Union[int, float, str],
    p: Optional[int] = None,
    *,
    max_k: int = 64,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Compress peft LoRA adapters into one Share model; returns ``model``, wrapped in place.

    ``model``: the plain base model the adapters were trained on (the object given to
    ``peft.get_peft_model``). ``adapter_paths``: adapter directories (a task per directory, named
    after it) or ``{task name: directory}``. ``k``: subspace size per layer (an int, capped at the
    stacked rank of the adapters' factors) or an explained-energy threshold (a float in (0, 1],
    at most ``max_k``). ``p``: a task's coefficient columns, default the largest adapter rank
    (exact for every adapter; a smaller p keeps each update's best rank-p part).

    Every adapted ``nn.Linear`` becomes a :class:`~share_kernels.ShareLinear` with one task per
    adapter (``layer.tasks`` in the given order; serve one with ``layer.set_task`` /
    ``ContinualLearner.set_task``, many in one batch with the multi-task forward). The result
    equals each adapter's ``PeftModel`` output to float rounding when k covers the stacked rank
    (and ``min(d_in, d_out)`` allows it: U and V share k). ``device``: where the float64 SVDs
    run (default: each layer's device); a GPU makes hundreds of adapters quick.
    """
    adapters = read_peft_adapters(adapter_paths)
    ingest(model, adapters, k, p, max_k=max_k, device=device)
    return model


# ------------------------------------------------------------------------- export


def to_peft_adapter(
    model: nn.Module,
    task: str,
    directory: Union[str, os.PathLike],
    *,
    base_model_name_or_path: Optional[Union[str, os.PathLike]] = None,
    task_type: Optional[str] = None,
) -> None:
    """Write Share task ``task`` of a wrapped ``model`` as a peft LoRA adapter of rank p.

    ``directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` (each written
    atomically): per layer ``lora_A = (U eps_a)ᵀ`` (p, d_in), ``lora_B = scale · V eps_b`` (d_out, p),
    ``lora_alpha = r = p`` (peft's scaling 1), ``target_modules`` a regex naming exactly the Share
    layers. ``peft.PeftModel.from_pretrained(base, directory)`` then computes the same outputs as
    the Share model with ``task`` active. ``base_model_name_or_path`` and ``task_type`` default to
    the source adapter's when the model came from :func:`from_peft_adapters`.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; build it with from_peft_adapters or wrap")
    bad = [n for n, layer in layers.items() if not isinstance(layer, ShareLinear)]
    if bad:
        raise ValueError(f"to_peft_adapter exports Share layers; {bad[:3]} are {type(layers[bad[0]]).__name__}")
    for n, layer in layers.items():
        if task not in layer.tasks:
            raise ValueError(f"unknown task {task!r}; layer {n!r} has tasks {layer.tasks}")
        if layer.training_task is not None:
            raise ValueError(f"layer {n!r}: task {layer.training_task!r} is still in training; end it first")
    ps = {layer.p for layer in layers.values()}
    if len(ps) != 1:
        raise ValueError(f"the layers have different p {sorted(ps)}; a peft adapter has one rank per config")
    p = ps.pop()
    source = getattr(model, SOURCES_ATTR, {}).get(task, {})
    if isinstance(base_model_name_or_path, os.PathLike):  # a local model directory: JSON holds strings
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    tensors = {}
    with torch.no_grad():
        for n, layer in layers.items():
            A, B = layer.task_factors(task)  # (d_in, p), (d_out, p)
            tensors[f"base_model.model.{n}.lora_A.weight"] = A.t().contiguous()
            tensors[f"base_model.model.{n}.lora_B.weight"] = (layer.scale * B).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else source.get("task_type"),
        "base_model_name_or_path": (
            base_model_name_or_path if base_model_name_or_path is not None else source.get("base_model_name_or_path")
        ),
        "r": p,
        "lora_alpha": p,
        "use_rslora": False,
        "target_modules": _exact_names_regex(list(layers)),
        "lora_dropout": 0.0,
        "bias": "none",
        # peft's flag for Conv1D targets (it forces the right value per layer type anyway)
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _save_tensors(os.path.join(directory, SAFETENSORS_NAME), tensors, {"format": "pt"})
    atomic_write(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2).encode())


__all__ = [
    "LayerFit",
    "PeftLora",
    "balanced_factors",
    "check_compatible",
    "check_model_layers",
    "coefficients",
    "error_rows",
    "fit_layer",
    "from_peft_adapters",
    "ingest",
    "read_peft_adapter",
    "read_peft_adapters",
    "to_peft_adapter",
]
