"""``share_kernels::project_complement``: projection onto (the complement of) a subspace.

X (d, n), M (d, k) with orthonormal columns (a DualGPM gradient memory, InfLoRA's old-task
subspace):

* ``mode="remove"``: ``X - M (Mᵀ X)``, the part of X outside span(M);
* ``mode="retain"``: ``M (Mᵀ X)``, the part inside; the two add up to X.

``project_complement_grouped(Xs, Ms, mode)`` does the same for many (X, M) pairs of any shapes
in one call (InfLoRA touches every adapted layer at each task boundary).

The schemas and the CPU and CUDA kernels are C++ (``csrc/``), loaded on the first call by
:mod:`share_kernels._ext`; without a compiled extension the same schemas are defined here with
:func:`project_complement_reference` as their kernel, after one warning. The fake kernels live
here either way. Outputs are new contiguous (d, n) tensors in X's dtype; fp16 / bf16 accumulate
in fp32 and round once. No autograd: the ops run at task boundaries, outside training.

**Where CUDA runs the fused pass and where cuBLAS** (:func:`uses_cublas`, a pure function of
k and the dtype, decided per pair). Per element of X the op does 4k FLOPs (``Mᵀ X`` and
``M P``, 2k each). The fused extension kernel reads X once and writes the output once: 2s bytes
per element (s the element size), so its arithmetic intensity is 2k/s FLOP/B, and it runs on
the FMA units (no tensor cores): about 67 TFLOP/s fp32 on an H100 SXM against 3.35 TB/s of
HBM, a ridge at 67/3.35 = 20 FLOP/B. The cuBLAS form (:func:`project_complement_cublas`:
``P = Mᵀ X``, then ``addmm(X, M, P, alpha=-1)`` with the subtraction in cuBLAS's epilogue)
reads X twice (3s bytes per element) but runs both products on tensor cores (bf16: 989 TFLOP/s,
ridge 989/3.35 ≈ 295 FLOP/B, so at the k of a gradient memory it stays memory bound).
Time per element, fused: max(2s/3.35e12, 4k/67e12); cuBLAS: max(3s/3.35e12, 4k/989e12).

* bf16 (s = 2): the fused pass is memory bound while 4k/67 < 4/3.35, k < 20; cuBLAS wins once
  4k/67 > 6/3.35, k > 30, even if the fused kernel reached the FMA peak (it does not: no
  register blocking beyond 2 columns x 32 rows). Switch: **k ≥ 32** goes to cuBLAS, where the
  first product is formed in fp32 (``mm`` with ``out_dtype=float32``: fp32 accumulation however
  cuBLAS splits the reduction over d) and rounded once to bf16 before the second.
* fp16: stays fused at every k. ``P = Mᵀ X`` can exceed fp16's range (|P| is bounded by a
  column norm of X, not by its largest element); the fused kernel keeps P in fp32, cuBLAS's
  ``addmm`` cannot take an fp32 P against an fp16 M without a full-size fp32 copy.
* fp32 (s = 4; no TF32, which would change the numerics): both forms are FMA bound above
  k = 40 (8/3.35 = 4k/67), and there cuBLAS's SGEMM, register blocked, runs nearer the FMA peak
  than the fused kernel: **k ≥ 64** goes to cuBLAS.
* fp64 (s = 8, FMA 34 TFLOP/s, DGEMM on fp64 tensor cores at 67): the fused pass is memory
  bound while 4k/34 < 16/3.35, k < 40: **k ≥ 64** goes to cuBLAS.

None of this has been timed on a GPU: the switch points come from the model above.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

from .. import _ext
from .._utils import check_flag, check_float_dtypes, check_ndim, check_same_device, cuda_matmul_allows_tf32, shape_str

_OP = "project_complement"
_OP_GROUPED = "project_complement_grouped"
MODES = ("remove", "retain")
# The extension defines the same schemas (csrc/ops.cpp); these serve only without it.
_SCHEMAS = {
    _OP: '(Tensor X, Tensor M, str mode="remove") -> Tensor',
    _OP_GROUPED: '(Tensor[] Xs, Tensor[] Ms, str mode="remove") -> Tensor[]',
}


def project_complement_reference(X: Tensor, M: Tensor, mode: str = "remove") -> Tensor:
    """Pure PyTorch in the inputs' dtype: the fallback kernel and the oracle of tests and benchmarks."""
    retained = M @ (M.T @ X)
    return (X - retained).contiguous() if mode == "remove" else retained


# Smallest k that goes to cuBLAS on CUDA, per dtype (see the module docstring); fp16: never.
CUBLAS_MIN_K = {torch.bfloat16: 32, torch.float32: 64, torch.float64: 64}


def uses_cublas(d: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a CUDA call of shape X (d, n), M (d, k) runs :func:`project_complement_cublas`
    (compute bound at this k) rather than the fused single pass (memory bound). CPU calls always
    run the extension's blocked kernel. A pure function of the shape and dtype."""
    min_k = CUBLAS_MIN_K.get(dtype)
    return min_k is not None and k >= min_k and d > 0 and n > 0


def _routes_to_cublas(X: Tensor, M: Tensor) -> bool:
    """:func:`uses_cublas` for this call, and nothing that would change the op's numerics: not
    under CUDA autocast (the op's own autocast rule casts to fp32 first; the fused kernel then
    runs), and fp32 only while matmuls are full fp32 (no TF32)."""
    if not X.is_cuda or not uses_cublas(X.shape[0], X.shape[1], M.shape[1], X.dtype):
        return False
    if torch.is_autocast_enabled("cuda"):
        return False
    return X.dtype != torch.float32 or not cuda_matmul_allows_tf32()


def project_complement_cublas(X: Tensor, M: Tensor, mode: str = "remove") -> Tensor:
    """The compute-bound form: two GEMMs, the subtraction in the second one's epilogue.

    ``P = Mᵀ X`` accumulated in fp32 (on CUDA ``mm(out_dtype=float32)``, so cuBLAS's split-K
    reductions stay fp32 too) and rounded once to X's dtype; then ``X - M P`` as
    ``addmm(X, M, P, alpha=-1)`` (fp32 accumulation, one rounding) or ``M P``. No d x n
    intermediate but the output. Runs on any device (the CPU path exists for tests).
    """
    dtype = X.dtype
    if dtype in (torch.float16, torch.bfloat16):
        if X.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
            P = torch.mm(M.T, X, out_dtype=torch.float32)
        else:  # aten::mm.dtype has no CPU kernel (nor older torch): the same fp32 sums, spelled out
            P = torch.mm(M.T.float(), X.float())
        P = P.to(dtype)
    else:
        P = torch.mm(M.T, X)
    if mode == "remove":
        return torch.addmm(X, M, P, beta=1, alpha=-1)
    return torch.mm(M, P)


def _check_pair(op: str, X: Tensor, M: Tensor, x_name: str, m_name: str) -> None:
    for name, t in ((x_name, X), (m_name, M)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    check_ndim(op, x_name, X, 2, "(d, n)")
    check_ndim(op, m_name, M, 2, "(d, k)")
    if M.shape[0] != X.shape[0]:
        raise ValueError(
            f"{op}: {m_name} must have as many rows as {x_name}; "
            f"got {x_name} {shape_str(X)} and {m_name} {shape_str(M)}"
        )


def _check_mode(op: str, mode) -> None:
    check_flag(op, "mode", mode, str)
    if mode not in MODES:
        raise ValueError(f'{op}: mode must be "remove" or "retain"; got {mode!r}')


def check_project_complement_inputs(X: Tensor, M: Tensor, mode: str) -> None:
    """ValueError for shapes, devices and mode; TypeError for dtypes; naming arguments and shapes."""
    _check_mode(_OP, mode)
    _check_pair(_OP, X, M, "X", "M")
    check_float_dtypes(_OP, X=X, M=M)
    check_same_device(_OP, X=X, M=M)


def check_project_complement_grouped_inputs(Xs: Sequence[Tensor], Ms: Sequence[Tensor], mode: str) -> None:
    """As :func:`check_project_complement_inputs` for every pair; one dtype and device for all."""
    _check_mode(_OP_GROUPED, mode)
    for name, seq in (("Xs", Xs), ("Ms", Ms)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{_OP_GROUPED}: {name} must be a list or tuple of tensors; got {type(seq).__name__}")
    if len(Xs) != len(Ms):
        raise ValueError(f"{_OP_GROUPED}: Xs and Ms must have the same length; got {len(Xs)} and {len(Ms)}")
    for i, (X, M) in enumerate(zip(Xs, Ms)):
        _check_pair(_OP_GROUPED, X, M, f"Xs[{i}]", f"Ms[{i}]")
    if Xs:
        named = {f"Xs[{i}]": X for i, X in enumerate(Xs)} | {f"Ms[{i}]": M for i, M in enumerate(Ms)}
        check_float_dtypes(_OP_GROUPED, **named)
        check_same_device(_OP_GROUPED, **named)


def _fake(X, M, mode="remove"):
    check_project_complement_inputs(X, M, mode)
    return X.new_empty(X.shape)


def _fake_grouped(Xs, Ms, mode="remove"):
    check_project_complement_grouped_inputs(Xs, Ms, mode)
    return [X.new_empty(X.shape) for X in Xs]


def _reference_kernel(X, M, mode="remove"):
    check_project_complement_inputs(X, M, mode)
    return project_complement_reference(X, M, mode)


def _reference_grouped_kernel(Xs, Ms, mode="remove"):
    check_project_complement_grouped_inputs(Xs, Ms, mode)
    return [project_complement_reference(X, M, mode) for X, M in zip(Xs, Ms)]


_fallback_lib: torch.library.Library | None = None
_ready = False
_ready_lock = threading.Lock()


@torch.compiler.assume_constant_result
def _ensure_ops() -> bool:
    """Make the two ops exist with their fake kernels: the extension's, or the reference's.

    Runs once; under ``torch.compile`` it runs at trace time, so a compiled first call needs
    no graph break.
    """
    global _fallback_lib, _ready
    if _ready:
        return True
    with _ready_lock:  # two threads' first calls must not register twice
        if not _ready:
            if not _ext.load():
                _fallback_lib = torch.library.Library("share_kernels", "FRAGMENT")
                for name, schema in _SCHEMAS.items():
                    _fallback_lib.define(name + schema)
                for key in ("CPU", "CUDA"):
                    _fallback_lib.impl(_OP, _reference_kernel, key)
                    _fallback_lib.impl(_OP_GROUPED, _reference_grouped_kernel, key)
            torch.library.register_fake(f"share_kernels::{_OP}")(_fake)
            torch.library.register_fake(f"share_kernels::{_OP_GROUPED}")(_fake_grouped)
            from ._autocast import register as _register_autocast

            for _name in (_OP, _OP_GROUPED):
                _register_autocast(_name, "fp32")
            _ready = True
    return True


def project_complement(X: Tensor, M: Tensor, mode: str = "remove") -> Tensor:
    """``X - M (Mᵀ X)`` (``mode="remove"``) or ``M (Mᵀ X)`` (``mode="retain"``).

    Args:
        X: (d, n), any strides. M: (d, k) with orthonormal columns. One floating dtype
        (fp32, fp64, fp16, bf16), one device.
    Returns:
        A new contiguous (d, n) tensor in X's dtype. CPU: one pass over column blocks of X;
        CUDA: Mᵀ X then the update with the subtraction fused, no d x n intermediate, or at a
        k where that is compute bound (:func:`uses_cublas`) the same two products in cuBLAS.
    """
    check_project_complement_inputs(X, M, mode)
    if X.numel() == 0 or M.numel() == 0:  # nothing to stream (the extension's kernels assume d, n, k > 0)
        return project_complement_reference(X, M, mode)
    if _routes_to_cublas(X, M):
        return project_complement_cublas(X, M, mode)
    _ensure_ops()
    return torch.ops.share_kernels.project_complement(X, M, mode)


def project_complement_grouped(Xs: Sequence[Tensor], Ms: Sequence[Tensor], mode: str = "remove") -> list[Tensor]:
    """``[project_complement(X, M, mode) for X, M in zip(Xs, Ms)]`` in one call.

    Pairs may differ in d, n and k but share one dtype and device. CPU: one parallel loop over
    the column blocks of all layers; CUDA: two kernel launches per 40 layers.
    """
    check_project_complement_grouped_inputs(Xs, Ms, mode)
    if not Xs:
        return []  # the dispatcher needs a tensor to pick a kernel
    # zero-size pairs run the reference (the extension's kernels assume d, n, k > 0); on CUDA,
    # pairs whose k makes them compute bound run cuBLAS (see uses_cublas), the rest one grouped call
    cublas = {i for i, (X, M) in enumerate(zip(Xs, Ms)) if _routes_to_cublas(X, M)}
    full = [i for i, (X, M) in enumerate(zip(Xs, Ms)) if X.numel() and M.numel() and i not in cublas]
    if len(full) == len(Xs):
        _ensure_ops()
        return torch.ops.share_kernels.project_complement_grouped(list(Xs), list(Ms), mode)
    out = [
        project_complement_cublas(Xs[i], Ms[i], mode) if i in cublas
        else None if i in full else project_complement_reference(Xs[i], Ms[i], mode)
        for i in range(len(Xs))
    ]
    if full:
        _ensure_ops()
        done = torch.ops.share_kernels.project_complement_grouped([Xs[i] for i in full], [Ms[i] for i in full], mode)
        for i, r in zip(full, done):
            out[i] = r
    return out
