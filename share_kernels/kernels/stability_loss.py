"""Triton kernel for PS-LoRA's stability loss, its gradients, and the host launcher.

``L = sum((1 - tanh(a D) * tanh(a P)) * D**2)`` with ``D = B @ A``; A (R, N), B (M, R),
P (M, N), a = alpha. With ``w = 1 - tanh(a D) tanh(a P)``:

    G = dL/dD = 2 w D - a tanh(a P) (1 - tanh(a D)**2) D**2,   dA = Bᵀ G,   dB = G Aᵀ.

Grid ``(cdiv(N, BLOCK_N), S)``: program (n, s) owns the columns of block n and the rows of
split s. It loads its A block (R, BLOCK_N) once, then walks its rows BLOCK_M at a time: forms
the D tile from A and a B block in registers, reads the P tile, adds the tile's
loss to a register accumulator and, with ``WITH_GRAD``, computes the G tile, adds ``Bᵀ G`` to a
register accumulator of its dA block and writes ``G Aᵀ`` (this tile's share of dB) to a partial
buffer. Nothing of size M x N is written.

All three dots (D and dB contract over R, dA over BLOCK_M) run on fp32 operands (``ieee``): G
must not be rounded to 16 bits, they are small next to the elementwise work, and with a 16-bit
MMA for D the gradient variant spilled on sm_90 (layout conversions between the MMA and FMA
layouts).

Reduction across programs is two-level and deterministic (no atomics): the kernel writes
partials ``loss_part[S, n_blocks]``, ``da_part[S, R, N]``, ``db_part[n_blocks, M, R]`` (fp32) and
the launcher sums them with ``torch.sum`` (fixed order). The partials are ``S + n_blocks``
copies of an R-wide factor (about 12 MB at d = 4096, r = 16 on 132 SMs), against the several M x N
temporaries of plain PyTorch (64 MB each in fp32); atomics would save them but make the
gradients run-to-run nondeterministic.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._utils import sm_count, triton_interpreting

#: Largest R the kernel keeps in registers (the dA accumulator is R x BLOCK_N fp32); beyond it
#: the op runs its (chunked) reference.
MAX_FUSED_RANK = 64
#: Row splits are multiples of this, the largest BLOCK_M of any config, so every config tiles them.
_ROW_QUANTUM = 64


def _config(bm, warps, stages=2):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# BLOCK_N is chosen by the launcher (the dB partial buffer depends on it); BLOCK_M and the
# warps are tuned. The gradient variant holds about six BLOCK_M x BLOCK_N fp32 tiles (D, P, the
# two tanh, w, G) plus the R x BLOCK_N dA accumulator and A, so what spills depends on R too.
_CONFIGS = [_config(64, 8), _config(32, 8), _config(16, 8), _config(16, 4)]
# (BLOCK_M, num_warps) that compile without spills for sm_90, per (BLOCK_R, BLOCK_N), forward
# and gradient variants, bf16 / fp16 (tests/test_sm90_fit.py). ptxas is not monotonic here:
# at (32, 64) the gradient spills 8 B with BM=16 w4 in 16-bit and 8-16 B with w8 in fp32.
_NO_SPILL = {
    (16, 64): {(32, 8), (16, 8)},
    (16, 128): {(32, 8), (16, 8), (16, 4)},
    (32, 64): {(32, 8), (16, 8)},
    (32, 128): {(16, 8)},
    (64, 64): {(16, 8)},
}
#: fp32 inputs where they differ (at (16, 128) BM=16 w8 spills 8 B on unaligned N).
_NO_SPILL_FP32 = {**_NO_SPILL, (16, 128): {(32, 8), (16, 4)}, (32, 64): {(16, 4)}}
# Under the interpreter one configuration only: autotuning there would run every config.
_INTERPRETER = [_config(16, 4, 1)]


def _prune(configs, named_args, **kwargs):
    """Keep the configs known not to spill at this (BLOCK_R, BLOCK_N) and input width; the
    interpreter's one stays."""
    if len(configs) == 1:
        return configs
    key = (kwargs.get("BLOCK_R", named_args.get("BLOCK_R")), kwargs.get("BLOCK_N", named_args.get("BLOCK_N")))
    a = named_args.get("a_ptr")
    table = _NO_SPILL_FP32 if getattr(a, "dtype", None) == torch.float32 else _NO_SPILL
    ok = table.get(key, {(16, 8)})
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.num_warps) in ok]
    return keep or [_config(16, 8)]


#: Every configuration the prune may keep (compiled by tests/test_sm90_fit.py).
CONFIGS = _CONFIGS


def _autotune_configs():
    return _INTERPRETER if triton_interpreting() else CONFIGS


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow (exp2 -> inf or 0), and is exact
    # to ~1e-7 absolute, which is all the loss needs (tanh only enters through 1 - tanh * tanh).
    e = tl.exp2(x * 2.8853900817779268)  # 2 / ln 2
    return 1.0 - 2.0 / (e + 1.0)


@triton.autotune(
    configs=_autotune_configs(),
    key=["M", "N", "BLOCK_R", "BLOCK_N", "WITH_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _stability_loss_kernel(
    a_ptr, b_ptr, p_ptr, g_ptr,
    loss_ptr, da_ptr, db_ptr,
    M, N, R, ROWS_PER_SPLIT,
    alpha,
    stride_ar, stride_an,
    stride_bm, stride_br,
    stride_pm, stride_pn,
    stride_das, stride_dar,
    stride_dbn, stride_dbm,
    WITH_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R

    # Masked entries of A (and B below) are 0, so D, the loss and G are 0 outside the matrix.
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_n[None, :] * stride_an,
                mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    a32 = a.to(tl.float32)
    loss_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    da_acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if WITH_GRAD:
        upstream = tl.load(g_ptr).to(tl.float32)

    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        # int64 row offsets: offs_m * stride_pm reaches 2^31 on a P of 2^31 elements.
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < row_end
        b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b32 = b.to(tl.float32)
        d = tl.dot(b32, a32, input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_n.to(tl.int64)[None, :] * stride_pn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        tp = _tanh(alpha * p)
        td = _tanh(alpha * d)
        w = 1.0 - td * tp
        d2 = d * d
        loss_acc += w * d2
        if WITH_GRAD:
            g = (2.0 * w * d - alpha * tp * (1.0 - td * td) * d2) * upstream
            da_acc = tl.dot(tl.trans(b32), g, da_acc, input_precision="ieee")
            db = tl.dot(g, tl.trans(a32), input_precision="ieee")  # (BLOCK_M, BLOCK_R)
            tl.store(db_ptr + pid_n.to(tl.int64) * stride_dbn + offs_m[:, None] * stride_dbm + offs_r[None, :],
                     db, mask=m_ok[:, None] & r_ok[None, :])

    n_blocks = tl.num_programs(0)
    tl.store(loss_ptr + pid_s * n_blocks + pid_n, tl.sum(tl.sum(loss_acc, axis=1), axis=0))
    if WITH_GRAD:
        tl.store(da_ptr + pid_s.to(tl.int64) * stride_das + offs_r[:, None] * stride_dar + offs_n[None, :],
                 da_acc, mask=r_ok[:, None] & n_ok[None, :])


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 4  # interpreter: enough programs to exercise both reduction levels


def block_n_for(N: int, block_r: int) -> int:
    """Column block: 128 on wide matrices (half the dB partials of 64) when R <= 32, else 64
    (no config of BLOCK_N = 128 and R = 64 compiles without spills)."""
    return 128 if N >= 2048 and block_r <= 32 else 64


def kernel_args(A, B, P, g, loss_part, da_part, db_part, rows, alpha, with_grad):
    """Positional and keyword arguments of one launch (shared with :mod:`share_kernels.kernels.aot`)."""
    R, N = A.shape
    M = B.shape[0]
    block_r = max(16, triton.next_power_of_2(R))
    args = (
        A, B, P, g,
        loss_part, da_part, db_part,
        M, N, R, rows,
        float(alpha),
        A.stride(0), A.stride(1),
        B.stride(0), B.stride(1),
        P.stride(0), P.stride(1),
        da_part.stride(0) if with_grad else 0, da_part.stride(1) if with_grad else 0,
        db_part.stride(0) if with_grad else 0, db_part.stride(1) if with_grad else 0,
    )
    return args, dict(WITH_GRAD=with_grad, BLOCK_R=block_r, BLOCK_N=block_n_for(N, block_r))


def stability_loss_plan(A, B, with_grad):
    """(n_blocks, splits, rows per split) and the partial buffers of one launch."""
    R, N = A.shape
    M = B.shape[0]
    dev = A.device
    block_r = max(16, triton.next_power_of_2(R))
    n_blocks = triton.cdiv(N, block_n_for(N, block_r))
    splits = max(1, min(triton.cdiv(_target_programs(dev), n_blocks), triton.cdiv(M, _ROW_QUANTUM)))
    rows = triton.cdiv(triton.cdiv(M, splits), _ROW_QUANTUM) * _ROW_QUANTUM
    splits = triton.cdiv(M, rows)
    loss_part = torch.empty((splits, n_blocks), device=dev, dtype=torch.float32)
    if with_grad:
        da_part = torch.empty((splits, R, N), device=dev, dtype=torch.float32)
        db_part = torch.empty((n_blocks, M, R), device=dev, dtype=torch.float32)
    else:
        da_part = db_part = loss_part  # never touched when WITH_GRAD is False
    return n_blocks, splits, rows, loss_part, da_part, db_part


def stability_loss_forward(
    A: torch.Tensor,
    B: torch.Tensor,
    P: torch.Tensor,
    alpha: float,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the kernel on A (R, N), B (M, R), P (M, N) (any strides), R <= MAX_FUSED_RANK.

    Returns the loss (0-dim fp32) and, when ``grad_out`` (a 0-dim tensor, read on the device,
    no host sync) is given, ``grad_out * dA`` (R, N) and ``grad_out * dB`` (M, R) in fp32.
    """
    R, N = A.shape
    M = B.shape[0]
    if R > MAX_FUSED_RANK:
        raise ValueError(f"stability_loss_forward: r={R} exceeds MAX_FUSED_RANK={MAX_FUSED_RANK}")
    dev = A.device
    with_grad = grad_out is not None
    if M == 0 or N == 0 or R == 0:
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        if not with_grad:
            return zero, None, None
        return zero, A.new_zeros((R, N), dtype=torch.float32), B.new_zeros((M, R), dtype=torch.float32)
    n_blocks, splits, rows, loss_part, da_part, db_part = stability_loss_plan(A, B, with_grad)
    g = grad_out if with_grad else loss_part
    args, meta = kernel_args(A, B, P, g, loss_part, da_part, db_part, rows, alpha, with_grad)
    _stability_loss_kernel[(n_blocks, splits)](*args, **meta)
    loss = loss_part.sum()
    if not with_grad:
        return loss, None, None
    return loss, da_part.sum(0), db_part.sum(0)
