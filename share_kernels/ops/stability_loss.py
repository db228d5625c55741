"""``share_kernels::stability_loss``: PS-LoRA's parameter-stability loss.

    L = sum((1 - tanh(alpha D) ⊙ tanh(alpha P)) ⊙ D²),   D = B A

A (r, d_in), B (d_out, r), P = prev_delta (d_out, d_in), alpha >= 0 the tanh sharpness. An
entry of D whose sign agrees with the history P (and both are large against 1/alpha) costs
almost nothing; one that opposes it costs up to ``2 D²``; where P is 0 the loss is ``D²``
(plain magnitude decay). Returns a 0-dim **float32** tensor for fp32 / fp16 / bf16 inputs (fp32
accumulation) and float64 for float64 inputs. Autograd for A and B (first order); prev_delta
and alpha get none. With ``w = 1 - tanh(αD) tanh(αP)`` the gradients are

    G = ∂L/∂D = 2 w D - α tanh(αP) (1 - tanh²(αD)) D²,   ∂L/∂A = Bᵀ G,   ∂L/∂B = G Aᵀ.

CUDA runs the Triton tile kernel (:mod:`share_kernels.kernels.stability_loss`): D is formed
tile by tile in registers, nothing of size d_out x d_in is written. The ops:

- ``stability_loss(A, B, prev_delta, alpha) -> L``, the contract op: forward only; its backward
  is ``stability_loss_backward`` (a second pass over P that takes the upstream gradient scalar
  on the device), so a loss computed under ``no_grad`` costs one forward-only pass;
- ``stability_loss_and_grad(A, B, prev_delta, alpha) -> (L, ∂L/∂A, ∂L/∂B)``: one pass for both;
  differentiable, its backward only scales the saved gradients by the upstream scalar.

The Python wrapper :func:`stability_loss` (what users and the layer call) takes the one-pass op
when A or B needs a gradient (the training step: half the passes over P), the forward-only op
otherwise. CPU runs the compiled extension's kernel (``csrc/stability_loss.cpp``, the private op
``share_kernels::_stability_loss_cpu``: row chunks in parallel, column tiles in L1, one fused
vectorized loop with its own float tanh, fp32 for fp32 / fp16 / bf16 inputs, the same bits for
every thread count) in all of them; float64 inputs, and every input when the extension is missing
(after one warning), run :func:`stability_loss_reference`.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .. import _ext
from .._utils import check_flag, check_float_dtypes, check_ndim, check_same_device, check_tensors, shape_str, use_triton

_OP = "stability_loss"

#: Elements of D per chunk of the reference (rows of D at a time): bounds its peak memory at a
#: few fp32 chunks of this size whatever d_out is.
REFERENCE_CHUNK_ELEMENTS = 1 << 18


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def stability_loss_reference(
    A: Tensor,
    B: Tensor,
    prev_delta: Tensor,
    alpha: float,
    grad_out: Tensor | None = None,
    chunk_elements: int = REFERENCE_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Pure PyTorch, chunked over rows of D: the CPU path and the oracle of the benchmark.

    Computes exactly ``sum((1 - tanh(αD) tanh(αP)) D²)`` and, when ``grad_out`` (0-dim) is
    given, ``grad_out * ∂L/∂A`` and ``grad_out * ∂L/∂B`` by the formulas in the module doc, one
    block of ``max(1, chunk_elements // d_in)`` rows of D at a time, so its peak memory is a few
    such blocks (never d_out x d_in). Accumulates in fp32 (fp64 for fp64 inputs). Returns
    ``(loss, dA, dB)``: loss 0-dim in the accumulation dtype, dA (r, d_in) and dB (d_out, r) in
    the inputs' dtype, or None without ``grad_out``. Runs under ``no_grad``: the gradients are
    explicit, autograd is the op's business (:func:`stability_loss`).
    """
    acc = _acc_dtype(A.dtype)
    d_out, d_in = prev_delta.shape
    rows = max(1, chunk_elements // max(d_in, 1))
    a = A.to(acc)
    loss = torch.zeros((), dtype=acc, device=A.device)
    with_grad = grad_out is not None
    if with_grad:
        g_up = grad_out.to(acc)
        dA = torch.zeros(A.shape, dtype=acc, device=A.device)
        dB = torch.empty(B.shape, dtype=acc, device=A.device)
    for i in range(0, d_out, rows):
        b = B[i : i + rows].to(acc)
        d = b @ a
        tp = torch.tanh(alpha * prev_delta[i : i + rows].to(acc))
        td = torch.tanh(alpha * d)
        w = 1.0 - td * tp
        d2 = d * d
        loss += (w * d2).sum()
        if with_grad:
            # G in place of tp: tp -> alpha tp (1 - td²) D² -> 2 w D - that, all in one buffer.
            td.mul_(td).neg_().add_(1.0).mul_(d2).mul_(tp).mul_(alpha)
            g = torch.mul(w, d, out=tp).mul_(2.0).sub_(td).mul_(g_up)
            dA.addmm_(b.t(), g)
            dB[i : i + rows] = g @ a.t()
    if not with_grad:
        return loss, None, None
    return loss, dA.to(A.dtype), dB.to(B.dtype)


def _check_argument_types(A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float) -> None:
    """What the dispatcher would reject with an unclear error; the rest is checked inside the op,
    after autocast has cast the inputs."""
    check_tensors(_OP, A=A, B=B, prev_delta=prev_delta)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{_OP}: alpha must be a number; got {type(alpha).__name__} {alpha!r}")


def check_stability_loss_inputs(A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float) -> None:
    """ValueError for shapes, devices and alpha, TypeError for dtypes, naming the argument."""
    _check_argument_types(A, B, prev_delta, alpha)
    check_float_dtypes(_OP, A=A, B=B, prev_delta=prev_delta)
    check_same_device(_OP, A=A, B=B, prev_delta=prev_delta)
    check_ndim(_OP, "A", A, 2, "(r, d_in)")
    check_ndim(_OP, "B", B, 2, "(d_out, r)")
    check_ndim(_OP, "prev_delta", prev_delta, 2, "(d_out, d_in)")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{_OP}: B must have shape (d_out, r={A.shape[0]}); got A {shape_str(A)} and B {shape_str(B)}")
    if prev_delta.shape != (B.shape[0], A.shape[1]):
        raise ValueError(
            f"{_OP}: prev_delta must have shape (d_out={B.shape[0]}, d_in={A.shape[1]}); got prev_delta "
            f"{shape_str(prev_delta)} with A {shape_str(A)} and B {shape_str(B)}"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{_OP}: alpha must be a finite number >= 0; got {alpha!r}")


#: Input dtypes the extension's CPU kernel takes (fp32 compute); float64 runs the reference.
CPU_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_cpu_kernel: bool | None = None


def _cpu_kernel_loaded() -> bool:
    """Whether the extension, and in it this op's CPU kernel, is loaded (decided once per process).
    :mod:`share_kernels._ext` warns once when there is no extension; an extension built before the
    kernel existed gets its own warning."""
    global _cpu_kernel
    if _cpu_kernel is None:
        found = _ext.load() and hasattr(torch.ops.share_kernels, "_stability_loss_cpu")
        if _ext.state != "missing" and not found:
            warnings.warn(
                "share_kernels: the compiled extension has no _stability_loss_cpu kernel (built from older "
                "sources? rebuild it); stability_loss runs its pure-PyTorch reference on CPU",
                RuntimeWarning,
                stacklevel=2,
            )
        _cpu_kernel = found
    return _cpu_kernel


def _cpu(A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float, grad_out: Tensor | None = None):
    """``(loss, dA, dB)`` off the Triton path: the extension's CPU kernel for CPU fp32 / fp16 / bf16
    inputs, :func:`stability_loss_reference` otherwise (float64, CUDA beyond the fused ranks, no
    extension). dA and dB are None without ``grad_out``."""
    if A.device.type == "cpu" and A.dtype in CPU_KERNEL_DTYPES and _cpu_kernel_loaded():
        g = None if grad_out is None else grad_out.reshape(())
        loss, dA, dB = torch.ops.share_kernels._stability_loss_cpu(A, B, prev_delta, float(alpha), g)
        return (loss, None, None) if grad_out is None else (loss, dA, dB)
    return stability_loss_reference(A, B, prev_delta, alpha, grad_out=grad_out)


def _fused(A: Tensor, B: Tensor, prev_delta: Tensor) -> bool:
    from ..kernels.stability_loss import MAX_FUSED_RANK

    return use_triton(A, B, prev_delta) and A.shape[0] <= MAX_FUSED_RANK


@torch.library.custom_op("share_kernels::stability_loss", mutates_args=())
def _stability_loss_op(A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float) -> Tensor:
    check_stability_loss_inputs(A, B, prev_delta, alpha)
    if not _fused(A, B, prev_delta):
        return _cpu(A, B, prev_delta, alpha)[0]
    from ..kernels.stability_loss import stability_loss_forward

    return stability_loss_forward(A, B, prev_delta, alpha)[0]


@_stability_loss_op.register_fake
def _(A, B, prev_delta, alpha):
    check_stability_loss_inputs(A, B, prev_delta, alpha)
    return A.new_empty((), dtype=_acc_dtype(A.dtype))


@torch.library.custom_op("share_kernels::stability_loss_backward", mutates_args=())
def _stability_loss_backward_op(
    grad_out: Tensor, A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """(dA, dB) = grad_out * (Bᵀ G, G Aᵀ), in A's and B's dtype; ``grad_out`` 0-dim."""
    if not _fused(A, B, prev_delta):
        _, dA, dB = _cpu(A, B, prev_delta, alpha, grad_out=grad_out)
        return dA, dB
    from ..kernels.stability_loss import stability_loss_forward

    _, dA, dB = stability_loss_forward(A, B, prev_delta, alpha, grad_out=grad_out.reshape(()))
    return dA.to(A.dtype), dB.to(B.dtype)


@_stability_loss_backward_op.register_fake
def _(grad_out, A, B, prev_delta, alpha):
    return A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    A, B, prev_delta, alpha = inputs
    ctx.alpha = alpha
    ctx.save_for_backward(A, B, prev_delta)


def _backward(ctx, grad_out):
    A, B, prev_delta = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    if not (need_a or need_b):
        return None, None, None, None
    dA, dB = torch.ops.share_kernels.stability_loss_backward(grad_out, A, B, prev_delta, ctx.alpha)
    return (dA if need_a else None), (dB if need_b else None), None, None


_stability_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("share_kernels::stability_loss_and_grad", mutates_args=())
def _stability_loss_and_grad_op(
    A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(L, ∂L/∂A, ∂L/∂B) in one pass over prev_delta; differentiable in A and B (first order),
    its backward only scales the saved gradients by the upstream scalar."""
    check_stability_loss_inputs(A, B, prev_delta, alpha)
    one = torch.ones((), device=A.device, dtype=_acc_dtype(A.dtype))
    if not _fused(A, B, prev_delta):
        return _cpu(A, B, prev_delta, alpha, grad_out=one)
    from ..kernels.stability_loss import stability_loss_forward

    loss, dA, dB = stability_loss_forward(A, B, prev_delta, alpha, grad_out=one)
    return loss, dA.to(A.dtype), dB.to(B.dtype)


@_stability_loss_and_grad_op.register_fake
def _(A, B, prev_delta, alpha):
    check_stability_loss_inputs(A, B, prev_delta, alpha)
    return A.new_empty((), dtype=_acc_dtype(A.dtype)), A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context_fused(ctx, inputs, output):
    _, dA, dB = output
    ctx.mark_non_differentiable(dA, dB)
    ctx.save_for_backward(dA, dB)


def _backward_fused(ctx, grad_loss, _grad_da, _grad_db):
    if torch.is_grad_enabled():
        raise RuntimeError("stability_loss: double backward is not supported (the gradients are precomputed)")
    dA, dB = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    g = grad_loss.to(dA.dtype)
    return (dA * g if need_a else None), (dB * g if need_b else None), None, None


_stability_loss_and_grad_op.register_autograd(_backward_fused, setup_context=_setup_context_fused)


def stability_loss(A: Tensor, B: Tensor, prev_delta: Tensor, alpha: float) -> Tensor:
    """``sum((1 - tanh(alpha * B@A) * tanh(alpha * prev_delta)) * (B@A)**2)``, fused on CUDA and CPU.

    When A or B needs a gradient, loss and gradients come from one pass over ``prev_delta``
    (``stability_loss_and_grad``; the backward scales them by the upstream gradient, first order
    only); otherwise the forward-only op runs. ``torch.ops.share_kernels.stability_loss`` itself
    is the forward-only op with a separate backward pass.

    Args:
        A: (r, d_in). B: (d_out, r). prev_delta: (d_out, d_in). One floating dtype (fp32,
        fp16, bf16; fp64 runs the reference), one device, any strides. alpha: finite, >= 0.
    Returns:
        0-dim float32 (float64 for float64 inputs), differentiable in A and B.
    """
    _check_argument_types(A, B, prev_delta, alpha)
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        return torch.ops.share_kernels.stability_loss_and_grad(A, B, prev_delta, alpha)[0]
    return torch.ops.share_kernels.stability_loss(A, B, prev_delta, alpha)
