"""``multi_task_linear``: Share's multi-tenant forward, one task per row (or per sequence).

Row i: ``F.linear(x_i, weight, bias) + ((x_i @ U) @ cores[task_ids_i]) @ V.T``; an id of -1
means the base layer alone, bit-identical to ``F.linear``.

x (..., d_in), weight (d_out, d_in), bias (d_out,) or None, U (d_in, k), cores (T, k, k),
V (d_out, k), task_ids integer of shape ``x.shape[:-1]`` (one id per row) or ``x.shape[:1]``
(one id per sequence).

This file holds the pure-PyTorch reference and its input checks; the custom op and the fused
Triton kernel build on them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_float_dtypes, check_ndim, check_same_device, shape_str

_OP = "multi_task_linear"


def check_multi_task_linear_inputs(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, cores: Tensor, V: Tensor, task_ids: Tensor
) -> None:
    """ValueError for shapes, devices and ids out of range; TypeError for dtypes."""
    check_float_dtypes(_OP, x=x, weight=weight, bias=bias, U=U, cores=cores, V=V)
    check_same_device(_OP, x=x, weight=weight, bias=bias, U=U, cores=cores, V=V, task_ids=task_ids)
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
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
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < -1 or hi >= cores.shape[0]:
            raise ValueError(
                f"{_OP}: task_ids must lie in [-1, T={cores.shape[0]}) (-1 = base only); got values in [{lo}, {hi}]"
            )


def multi_task_linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], U: Tensor, cores: Tensor, V: Tensor, task_ids: Tensor
) -> Tensor:
    """Pure PyTorch in the inputs' dtype: the CPU path and the oracle of tests and benchmarks.

    Rows are grouped by task, so the extra work is one ``(n_t, k) @ (k, k)`` product per task
    present. Rows with id -1 keep ``F.linear(x, weight, bias)`` untouched (bit-identical).
    """
    check_multi_task_linear_inputs(x, weight, bias, U, cores, V, task_ids)
    ids = task_ids.reshape(task_ids.shape + (1,) * (x.dim() - 1 - task_ids.dim())).expand(x.shape[:-1]).reshape(-1)
    x2 = x.reshape(-1, x.shape[-1])
    out = F.linear(x2, weight, bias)
    for t in ids.unique().tolist():
        if t < 0:
            continue
        rows = (ids == t).nonzero().squeeze(1)
        xr = x2.index_select(0, rows)
        out = out.index_put((rows,), out.index_select(0, rows) + ((xr @ U) @ cores[t]) @ V.t())
    return out.view(*x.shape[:-1], weight.shape[0])
