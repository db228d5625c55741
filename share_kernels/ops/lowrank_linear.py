"""``share_kernels::lowrank_linear``: ``y = F.linear(x, weight, bias) + (x @ U) @ C``.

x (..., d_in), weight (d_out, d_in), bias (d_out,) or None, U (d_in, k), C (k, d_out).
LoRA is ``U = A.T, C = scale * B.T``; InfLoRA concatenates its branches along k; Share uses
``C = core_t @ V.T``.

CPU runs :func:`lowrank_linear_reference`; CUDA runs the fused Triton kernel
(:mod:`share_kernels.kernels.lowrank_linear`). Autograd covers x, U, C, and weight / bias when
they require grad; the backward is its own op (``lowrank_linear_backward``) so that
``torch.compile`` sees two opaque nodes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float_dtypes, check_ndim, check_same_device, check_tensors, shape_str, use_triton

_OP = "lowrank_linear"


def lowrank_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, C: Tensor) -> Tensor:
    """Pure PyTorch in the inputs' dtype: the CPU path and the oracle of tests and benchmarks.

    ``t·C`` is added in place into ``F.linear``'s fresh output (one GEMM with beta = 1), not by a
    second pass over (M, d_out). The shrink is computed as ``tᵀ = Uᵀ xᵀ``: CPU BLAS runs the
    (k, d_in) x (d_in, M) product about 1.7x faster than x (M, d_in) times a k-column U
    (M = 256, d_in = 384 / 1536, k = 8; ``python benchmarks/cpu_parts.py``).
    """
    if x.dim() != 2:
        # 2-D in place, then one view: an in-place op on a view of the output would make autograd
        # copy the whole gradient in the backward (CopySlices)
        y = lowrank_linear_reference(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, bias, U, C)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias).addmm_((U.t() @ x.t()).t(), C)


def check_lowrank_linear_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, C: Tensor) -> None:
    """ValueError for shapes and devices, TypeError for dtypes, naming the argument and shapes."""
    check_tensors(_OP, ("bias",), x=x, weight=weight, bias=bias, U=U, C=C)
    check_float_dtypes(_OP, x=x, weight=weight, bias=bias, U=U, C=C)
    check_same_device(_OP, x=x, weight=weight, bias=bias, U=U, C=C)
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have shape (..., d_in); got a 0-d tensor")
    check_ndim(_OP, "weight", weight, 2, "(d_out, d_in)")
    check_ndim(_OP, "U", U, 2, "(d_in, k)")
    check_ndim(_OP, "C", C, 2, "(k, d_out)")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"{_OP}: x's last dimension must equal weight's d_in; got x {shape_str(x)} and weight {shape_str(weight)}"
        )
    if U.shape[0] != d_in:
        raise ValueError(f"{_OP}: U must have shape (d_in={d_in}, k); got U {shape_str(U)} with weight {shape_str(weight)}")
    if C.shape != (U.shape[1], d_out):
        raise ValueError(
            f"{_OP}: C must have shape (k={U.shape[1]}, d_out={d_out}); got C {shape_str(C)} with "
            f"U {shape_str(U)} and weight {shape_str(weight)}"
        )
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"{_OP}: bias must have shape (d_out={d_out},); got bias {shape_str(bias)}")


def _fused(x: Tensor, weight: Tensor, U: Tensor) -> bool:
    from ..kernels.lowrank_linear import MAX_FUSED_RANK, fits_cuda

    # zero-size inputs run the reference (nothing to fuse, no empty launch grid); on CUDA only what
    # fits sm_90 (16-bit, aligned sizes) runs the kernel, fp32 and the rest run cuBLAS.
    if x.dim() < 1 or weight.dim() != 2 or U.dim() != 2:
        return False  # the checks on the op's path name the argument
    cuda_ok = x.device.type != "cuda" or fits_cuda(x, weight.shape[1], weight.shape[0])
    nonempty = min(x.numel(), weight.numel(), U.numel()) > 0
    return use_triton(x, weight, U) and U.shape[1] <= MAX_FUSED_RANK and nonempty and cuda_ok


@torch.library.custom_op("share_kernels::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, C: Tensor) -> Tensor:
    check_lowrank_linear_inputs(x, weight, bias, U, C)
    if not _fused(x, weight, U):
        # k > MAX_FUSED_RANK, fp32 and unaligned sizes on CUDA land here too: cuBLAS, same math.
        return lowrank_linear_reference(x, weight, bias, U, C)
    from ..kernels.lowrank_linear import lowrank_linear_forward

    y, _ = lowrank_linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, U, C)
    return y.view(*x.shape[:-1], weight.shape[0])


@_lowrank_linear_op.register_fake
def _(x, weight, bias, U, C):
    check_lowrank_linear_inputs(x, weight, bias, U, C)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("share_kernels::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, U: Tensor, C: Tensor, needs: list[bool]
) -> list[Tensor]:
    """Gradients [dx, dweight, dbias, dU, dC]; an entry not in ``needs`` is an empty tensor.

    dx = dy W + (dy C^T) U^T   (fused kernel on CUDA; it also returns dy C^T in fp32)
    dU = x^T (dy C^T),  dC = (x U)^T dy,  dW = dy^T x,  db = sum dy
    Nothing of size M x d is formed besides dx itself.
    """
    need_x, need_w, need_b, need_u, need_c = needs
    d_in = x.shape[-1]
    d_out = weight.shape[0]
    rows = math.prod(x.shape[:-1])
    g2 = grad_out.reshape(rows, d_out)  # not -1: it cannot infer the rows when d_in or d_out is 0
    x2 = x.reshape(rows, d_in)
    # Distinct empties: a custom op's outputs may not alias each other.
    dx, dw, db, du, dc = (x.new_empty(0) for _ in range(5))
    t_g = None  # dy @ C^T, (M, k)
    if need_x:
        if _fused(x, weight, U):
            from ..kernels.lowrank_linear import lowrank_linear_forward

            dx2, t_g = lowrank_linear_forward(g2, weight.t(), None, C.t(), U.t(), store_t=need_u)
        else:
            t_g = g2 @ C.t()
            dx2 = torch.addmm(g2 @ weight, t_g, U.t())
        dx = dx2.view(x.shape)
    if need_u:
        if t_g is None:
            t_g = g2 @ C.t()
        du = x2.t() @ t_g.to(x.dtype)
    if need_c:
        dc = (x2 @ U).t() @ g2
    if need_w:
        dw = g2.t() @ x2
    if need_b:
        db = g2.sum(0)
    return [dx, dw, db, du, dc]


@_lowrank_linear_backward_op.register_fake
def _(grad_out, x, weight, U, C, needs):
    shapes = [x.shape, weight.shape, weight.shape[:1], U.shape, C.shape]
    return [x.new_empty(s) if n else x.new_empty(0) for s, n in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, U, C = inputs
    ctx.save_for_backward(x, weight, U, C)


def _backward(ctx, grad_out):
    x, weight, U, C = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad]
    if not any(needs):
        return None, None, None, None, None
    grads = torch.ops.share_kernels.lowrank_linear_backward(grad_out, x, weight, U, C, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, C: Tensor) -> Tensor:
    """``F.linear(x, weight, bias) + (x @ U) @ C`` as one fused kernel on CUDA.

    Args:
        x: (..., d_in). weight: (d_out, d_in). bias: (d_out,) or None.
        U: (d_in, k). C: (k, d_out). All one floating dtype (fp32, fp16, bf16; fp64 runs
        the reference), one device; any strides.
    Returns:
        (..., d_out) in x's dtype; ``x @ U`` is accumulated and kept in fp32 on CUDA.
    """
    check_tensors(_OP, ("bias",), x=x, weight=weight, bias=bias, U=U, C=C)
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type) and not _fused(x, weight, U):
        # Where the op would run the reference anyway (CPU, fp64, k too large to fuse), run it
        # here: the custom op's Python dispatch and autograd wrapper cost ~40 µs per forward and
        # ~160 µs per forward + backward on a 2-core CPU (d = 16, where the math is ~25 µs), and
        # plain autograd keeps x·U for the backward
        # instead of recomputing it. Same checks, same math; torch.compile still sees the op,
        # and under autocast the op runs (its autocast rule casts before the dtype check).
        check_lowrank_linear_inputs(x, weight, bias, U, C)
        return lowrank_linear_reference(x, weight, bias, U, C)
    return torch.ops.share_kernels.lowrank_linear(x, weight, bias, U, C)


def lowrank_merged_weight(weight: Tensor, U: Tensor, C: Tensor) -> Tensor:
    """``weight + (U @ C).T`` accumulated in fp32 (fp64 for fp64) and rounded once to weight's
    dtype: the merged-weight path for single-task inference, ``F.linear(x, W_merged, bias)``
    equal to ``lowrank_linear(x, weight, bias, U, C)`` up to the rounding of ``W_merged``.

    When it wins (bytes model, d_out x d_in weight of s-byte elements): merging reads W and
    writes W_merged, about the bytes of two decode forwards; after it every forward is exactly
    ``F.linear`` (no U, C or t traffic, no low-rank FLOPs: at prefill 1.2-4.7 % of the GEMM at
    k = 16-64, d = 4096). A fused call costing r times ``F.linear`` therefore pays the merge back
    after about 2 / (r - 1) forwards with unchanged U and C (r = 1.03: ~67; r = 1.3: ~7), which
    a served, frozen adapter reaches at once and a training step never does. The price is
    numerical: the delta ``(U C)ᵀ`` is stored at the precision of W's elements (bf16 keeps
    ~2^-9 of each |W_ij|), so deltas far below that are partly lost, where the fused op keeps
    ``x·U`` in fp32. A new tensor; the caller owns its lifetime (cache it while U, C and the
    active task stay the same).
    """
    check_tensors("lowrank_merged_weight", (), weight=weight, U=U, C=C)
    check_float_dtypes("lowrank_merged_weight", weight=weight, U=U, C=C)
    check_same_device("lowrank_merged_weight", weight=weight, U=U, C=C)
    check_ndim("lowrank_merged_weight", "weight", weight, 2, "(d_out, d_in)")
    check_ndim("lowrank_merged_weight", "U", U, 2, "(d_in, k)")
    check_ndim("lowrank_merged_weight", "C", C, 2, "(k, d_out)")
    d_out, d_in = weight.shape
    if U.shape[0] != d_in or C.shape != (U.shape[1], d_out):
        raise ValueError(
            f"lowrank_merged_weight: U must be (d_in={d_in}, k) and C (k, d_out={d_out}); got "
            f"U {shape_str(U)} and C {shape_str(C)} with weight {shape_str(weight)}"
        )
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return torch.addmm(weight.to(acc), C.t().to(acc), U.t().to(acc)).to(weight.dtype)
