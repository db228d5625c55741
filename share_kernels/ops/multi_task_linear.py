"""``share_kernels::multi_task_linear``: Share's multi-tenant forward, one task per row (or per sequence).

Row i: ``F.linear(x_i, weight, bias) + ((x_i @ U) @ cores[task_ids_i]) @ V.T``; an id of -1
means the base layer alone, bit-identical to ``F.linear(x, weight, bias)``.

x (..., d_in), weight (d_out, d_in), bias (d_out,) or None, U (d_in, k), cores (T, k, k),
V (d_out, k), task_ids integer of shape ``x.shape[:-1]`` (one id per row) or ``x.shape[:1]``
(one id per sequence). Inference only.

How it runs:

* CPU (and float64, k > 128, and on CUDA fp32 or d not a multiple of 16): :func:`multi_task_linear_reference`.
* CUDA (fp32 / fp16 / bf16): ``y = F.linear(x, weight, bias)`` by cuBLAS, then ONE Triton
  two Triton kernels (:mod:`share_kernels.kernels.multi_task_linear`) add the low-rank path of
  the adapted rows in place: the first forms ``(x·U)·cores[id]`` per row into an fp32 (M, k)
  buffer once per row block, the second adds ``·Vᵀ`` tile by tile; a base-only row is never
  written. A Triton base GEMM fused with it would be one pass fewer over y, but
  its rows could not be bit-identical to cuBLAS's ``F.linear``, and a kernel that fused the
  base only when no id is -1 would need a host sync to know; so the base stays cuBLAS.
* Two strategies for the low-rank kernels: ``"gather"`` (rows in their order; every row reads its
  own core, so a block costs the same whatever ids it holds; what ``"auto"`` picks, see
  :func:`choose_strategy`) and ``"grouped"`` (rows first sorted by id on device with
  ``torch.argsort``, as vLLM does, so a block holds about one task). ``strategy=`` forces one.

Ids and host syncs: shapes, dtypes and devices are always checked (metadata only). The value
check (``-1 <= id < T``, ``ValueError``) needs the values: on CPU it is free and always done; on
an accelerator it costs one sync, so it is skipped while a CUDA graph is being captured and
when ``check_ids=False`` (the caller has checked, as :func:`share_kernels.task_ids` does once
per forward instead of once per layer). An unchecked out-of-range id reads no memory: that row
gets the base output alone. Nothing on the CUDA path syncs or has a data-dependent shape, so
the op can be captured in a CUDA graph (after a warm-up call outside capture, which autotunes).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_flag, check_float_dtypes, check_ndim, check_same_device, check_tensors, shape_str, use_triton

_OP = "multi_task_linear"
STRATEGIES = ("auto", "gather", "grouped")



def _integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_multi_task_linear_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    U: Tensor,
    cores: Tensor,
    V: Tensor,
    task_ids: Tensor,
    check_values: bool = True,
) -> None:
    """ValueError for shapes, devices and (with ``check_values``) ids out of range; TypeError for dtypes."""
    check_tensors(_OP, ("bias",), x=x, weight=weight, bias=bias, U=U, cores=cores, V=V, task_ids=task_ids)
    check_float_dtypes(_OP, x=x, weight=weight, bias=bias, U=U, cores=cores, V=V)
    check_same_device(_OP, x=x, weight=weight, bias=bias, U=U, cores=cores, V=V, task_ids=task_ids)
    if not _integer(task_ids):
        raise TypeError(f"{_OP}: task_ids must be an integer tensor; got {str(task_ids.dtype).replace('torch.', '')}")
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have shape (..., d_in); got a 0-d tensor")
    check_ndim(_OP, "weight", weight, 2, "(d_out, d_in)")
    check_ndim(_OP, "U", U, 2, "(d_in, k)")
    check_ndim(_OP, "cores", cores, 3, "(T, k, k)")
    check_ndim(_OP, "V", V, 2, "(d_out, k)")
    d_out, d_in = weight.shape
    k = U.shape[1]
    if x.shape[-1] != d_in:
        raise ValueError(
            f"{_OP}: x's last dimension must equal weight's d_in; got x {shape_str(x)} and weight {shape_str(weight)}"
        )
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"{_OP}: bias must have shape (d_out={d_out},); got bias {shape_str(bias)}")
    if U.shape[0] != d_in:
        raise ValueError(
            f"{_OP}: U must have shape (d_in={d_in}, k); got U {shape_str(U)} with weight {shape_str(weight)}"
        )
    if V.shape != (d_out, k):
        raise ValueError(f"{_OP}: V must have shape (d_out={d_out}, k={k}); got V {shape_str(V)} with U {shape_str(U)}")
    if cores.shape[1:] != (k, k):
        raise ValueError(f"{_OP}: cores must have shape (T, k={k}, k={k}); got cores {shape_str(cores)}")
    if task_ids.shape != x.shape[:-1] and (x.dim() < 2 or task_ids.shape != x.shape[:1]):
        raise ValueError(
            f"{_OP}: task_ids must have shape x.shape[:-1] = {tuple(x.shape[:-1])} or x.shape[:1] = "
            f"{tuple(x.shape[:1])}; got task_ids {shape_str(task_ids)}"
        )
    if check_values:
        check_task_id_values(task_ids, cores.shape[0])


def check_task_id_values(task_ids: Tensor, num_tasks: int) -> None:
    """ValueError unless every id lies in [-1, num_tasks). Reads the values: one sync on a GPU."""
    if task_ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(task_ids.reshape(-1).long()))
        if lo < -1 or hi >= num_tasks:
            raise ValueError(
                f"{_OP}: task_ids must lie in [-1, T={num_tasks}) (-1 = base only); got values in [{lo}, {hi}]"
            )


def multi_task_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, cores: Tensor, V: Tensor, task_ids: Tensor
) -> Tensor:
    """Pure PyTorch in the inputs' dtype: the CPU path and the oracle of tests and benchmarks.

    Row-parallel, so the work does not depend on how many tasks the batch holds: ``t = x U``
    for all rows, then each row's (or sequence's) core gathered and applied in one batched
    product, then ``· Vᵀ``. Per-sequence ids gather one k x k core per sequence; per-row ids one
    per row, in chunks of rows that keep the gathered cores under ~16 MB. Rows with id -1 keep
    ``F.linear(x, weight, bias)`` untouched (bit-identical, selected with ``torch.where``).
    """
    check_multi_task_linear_inputs(x, weight, bias, U, cores, V, task_ids)
    out = F.linear(x, weight, bias)
    if cores.shape[0] == 0 or x.numel() == 0 or out.numel() == 0:
        return out  # no task, so every (valid) id is -1
    d_in, d_out, k = weight.shape[1], weight.shape[0], U.shape[1]
    ids = task_ids.long()
    valid = ids >= 0
    sel = ids.clamp(min=0)
    if ids.shape != x.shape[:-1]:  # one id per sequence: (B, rows of the sequence, d)
        x3 = x.reshape(x.shape[0], -1, d_in)
        delta = torch.bmm(x3 @ U, cores.index_select(0, sel)) @ V.t()
        mask = valid.view(-1, 1, 1)
        return torch.where(mask, out.view(delta.shape) + delta, out.view(delta.shape)).view(out.shape)
    x2, out2 = x.reshape(-1, d_in), out.reshape(-1, d_out)
    sel, mask = sel.reshape(-1), valid.reshape(-1, 1)
    t = x2 @ U
    chunk = max(1, (1 << 22) // max(k * k, 1))
    tc = torch.cat(
        [
            torch.bmm(t[i : i + chunk, None], cores.index_select(0, sel[i : i + chunk]))[:, 0]
            for i in range(0, t.shape[0], chunk)
        ]
    )
    return torch.where(mask, out2 + tc @ V.t(), out2).view(out.shape)


def choose_strategy(rows: int, num_tasks: int, run: int = 1) -> str:
    """The low-rank kernels' strategy from shapes alone (no look at the ids, so no sync).

    ``rows`` M, ``num_tasks`` T, ``run`` the rows that share an id by construction (S for
    per-sequence ids of x (B, S, d), else 1). Always ``"gather"``: the core kernel gives every
    row its own core (a row-parallel gather, see :mod:`share_kernels.kernels.multi_task_linear`),
    so a block's work does not depend on how many distinct ids it holds, and sorting the rows by
    id ("grouped", an ``argsort`` and a permuted row order) would only make rows of one task
    share their core loads in L1, for the price of the sort. ``strategy="grouped"`` still forces
    it. The arguments stay for callers that ask per shape.
    """
    del rows, num_tasks, run
    return "gather"


def _check_strategy(strategy) -> None:
    check_flag(_OP, "strategy", strategy, str)
    if strategy not in STRATEGIES:
        raise ValueError(f"{_OP}: strategy must be one of {STRATEGIES}; got {strategy!r}")


def _fused(x: Tensor, U: Tensor, V: Tensor) -> bool:
    from ..kernels.lowrank_linear import fits_cuda
    from ..kernels.multi_task_linear import MAX_FUSED_RANK

    # zero-size inputs run the reference (nothing to fuse, no empty launch grid); on CUDA only what
    # fits sm_90 (16-bit, aligned sizes) runs the kernel, fp32 and the rest run the reference.
    if x.dim() < 1 or U.dim() != 2 or V.dim() != 2:
        return False  # the checks on the op's path name the argument
    cuda_ok = x.device.type != "cuda" or fits_cuda(x, U.shape[0], V.shape[0])
    return use_triton(x) and U.shape[1] <= MAX_FUSED_RANK and x.numel() > 0 and U.numel() > 0 and cuda_ok


def _capturing(x: Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@torch.library.custom_op("share_kernels::multi_task_linear", mutates_args=())
def _multi_task_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    U: Tensor,
    cores: Tensor,
    V: Tensor,
    task_ids: Tensor,
    strategy: str = "auto",
    check_ids: bool = True,
) -> Tensor:
    _check_strategy(strategy)
    if not _fused(x, U, V):
        return multi_task_linear_reference(x, weight, bias, U, cores, V, task_ids)
    check_multi_task_linear_inputs(
        x, weight, bias, U, cores, V, task_ids, check_values=check_ids and not _capturing(x)
    )
    from ..kernels.multi_task_linear import multi_task_delta_

    d_in, d_out = weight.shape[1], weight.shape[0]
    y = F.linear(x, weight, bias)  # base-only rows are exactly this, never rewritten
    M = x.numel() // d_in if d_in else y.numel() // max(d_out, 1)
    per_row = task_ids.shape == x.shape[:-1]
    ids = task_ids.reshape(-1)
    run = 1 if per_row else (M // ids.numel() if ids.numel() else 1)
    if strategy == "auto":
        strategy = choose_strategy(M, cores.shape[0], run)
    order = None
    if strategy == "grouped":
        by_id = torch.argsort(ids, stable=True)
        order = by_id if run == 1 else (by_id[:, None] * run + torch.arange(run, device=ids.device)).reshape(-1)
    multi_task_delta_(y.view(M, d_out), x.reshape(M, d_in), U, cores, V, ids, ids_div=run, order=order)
    return y


@_multi_task_linear_op.register_fake
def _(x, weight, bias, U, cores, V, task_ids, strategy="auto", check_ids=True):
    _check_strategy(strategy)
    check_multi_task_linear_inputs(x, weight, bias, U, cores, V, task_ids, check_values=False)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_GRAD_MESSAGE = (
    f"{_OP} is inference-only and has no backward; run it under torch.no_grad() or "
    "torch.inference_mode() (or detach the inputs), or train one task at a time with lowrank_linear"
)


def _refuse_grad(ctx, inputs, output):
    raise RuntimeError(_GRAD_MESSAGE)


def _no_backward(ctx, grad_out):  # pragma: no cover - _refuse_grad raises first
    raise RuntimeError(_GRAD_MESSAGE)


_multi_task_linear_op.register_autograd(_no_backward, setup_context=_refuse_grad)


def multi_task_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    U: Tensor,
    cores: Tensor,
    V: Tensor,
    task_ids: Tensor,
    *,
    strategy: str = "auto",
    check_ids: bool = True,
) -> Tensor:
    """Row i: ``F.linear(x_i, weight, bias) + ((x_i @ U) @ cores[task_ids_i]) @ V.T``; -1 = base only.

    Args:
        x: (..., d_in). weight: (d_out, d_in). bias: (d_out,) or None. U: (d_in, k).
        cores: (T, k, k). V: (d_out, k). One floating dtype (fp32, fp16, bf16; fp64 runs the
        reference), one device, any strides.
        task_ids: integer, shape ``x.shape[:-1]`` (per row) or ``x.shape[:1]`` (per sequence),
        values in [-1, T).
        strategy: "auto" (:func:`choose_strategy`), "gather" or "grouped" (Triton path only).
        check_ids: check the id values (one host sync on a GPU; skipped anyway while a CUDA
            graph is captured). Unchecked out-of-range ids give the base row.
    Returns:
        (..., d_out) in x's dtype. Rows with id -1 are bit-identical to ``F.linear(x, weight, bias)``.
    Raises:
        ValueError / TypeError for bad inputs; RuntimeError if gradients are required.
    """
    check_tensors(_OP, ("bias",), x=x, weight=weight, bias=bias, U=U, cores=cores, V=V, task_ids=task_ids)
    _check_strategy(strategy)
    check_flag(_OP, "check_ids", check_ids, bool)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, U, cores, V)):
        raise RuntimeError(_GRAD_MESSAGE)
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type) and not _fused(x, U, V):
        # the op would run the reference: skip its Python dispatch (as lowrank_linear does)
        return multi_task_linear_reference(x, weight, bias, U, cores, V, task_ids)
    return torch.ops.share_kernels.multi_task_linear(x, weight, bias, U, cores, V, task_ids, strategy, check_ids)
