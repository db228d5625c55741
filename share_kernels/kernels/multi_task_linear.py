"""Triton kernel for Share's multi-tenant low-rank path, added in place into ``y``:

    y[i] += ((x[i] @ U) @ cores[ids[i]]) @ V.T      for rows with 0 <= ids[i] < T

and nothing for the other rows (id -1, or an unchecked out-of-range id), which are never
written. The base product ``y = F.linear(x, weight, bias)`` is cuBLAS's, computed before by the
op, so base-only rows are bit-identical to ``F.linear``; this kernel is the whole shared
low-rank path (shrink, per-row core, expand) in one launch.

One program owns BLOCK_M rows (in the order given by ``order`` when rows were grouped by task)
and a contiguous range of output column tiles:

1. loads its rows' ids; a block with no adapted row exits at once;
2. shrink: ``t = x_rows @ U`` (BLOCK_M x k), accumulated and kept in fp32;
3. core: one masked ``t @ cores[id]`` dot per distinct id present in the block (a loop over
   the block's distinct ids, found by min-reductions on device, so no host sync and no
   data-dependent shape): rows unsorted give up to BLOCK_M iterations ("gather"), rows sorted by
   id give about one ("grouped"). The core loads are double-buffered for k <= 64: the first is
   issued before the shrink, each next one before the current one's dots;
4. expand: for each of its column tiles, ``s @ V.T`` added to the y tile in fp32.

For fp16/bf16 the fp32 ``t`` and ``s`` enter the dots as a hi + lo pair of the input dtype
(~16 mantissa bits, as in ``kernels/lowrank_linear.py``). Programs split the columns when there
are too few row blocks to fill the GPU (decode); each then recomputes its rows' shrink and core
products, reading x rows and U from L2, rather than handing ``t`` over through memory and a
second launch (punica / vLLM's shrink + expand).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._utils import sm_count, triton_interpreting
from .lowrank_linear import CUDA_DTYPES, dot_precision

#: Largest k the kernel takes; beyond it the op runs its PyTorch reference.
MAX_FUSED_RANK = 128
#: Up to this (padded) k the kernel double-buffers the k x k core loads; above it the second
#: core tile would cost too many registers.
PREFETCH_MAX_RANK = 64


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Small, deliberate sets, all measured to compile for sm_90 with no spill and shared memory
# under 227 KB, bf16 and fp16, k <= 16 / 32 / 64 / 128, rows in order or grouped
# (tests/test_sm90_fit.py compiles them all).
#
# Decode-sized batches (M <= 64): long K tiles stream x and U; column splitting gives the
# parallelism (see _n_split).
_DECODE = [
    _config(16, 64, 128, 4, 3),
    _config(16, 64, 256, 4, 2),
]
# Larger batches: more rows per program amortise the U and V reads. BM=32 BN=128 w4 spills
# 208-224 B at k = 128 (as do BM=64 w4 tiles); 8 warps hold BM=64 BN=128 at every k.
_LARGE = [
    _config(32, 128, 64, 4, 3),
    _config(64, 128, 64, 8, 3),
]
# Under the interpreter one configuration only; small tiles so that tests on small shapes
# still cover several row blocks, K steps and column splits.
_INTERPRETER = [_config(16, 32, 32, 4, 1)]


def _prune(configs, named_args, **kwargs):
    """Decode configs for M <= 64, the larger ones above (only 8 warps at k > 64); 16-bit only
    (fp32 runs cuBLAS on CUDA, see kernels/lowrank_linear.py's CUDA_DTYPES)."""
    if len(configs) == 1:
        return configs
    x = named_args.get("x_ptr")
    if x is not None and getattr(x, "dtype", None) not in CUDA_DTYPES:
        raise ValueError(f"multi_task_linear kernel: {x.dtype} is not compiled for CUDA (the op routes it to cuBLAS)")
    block_r = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    if named_args["M"] <= 64:
        return _DECODE
    return _LARGE if block_r <= 64 else [c for c in _LARGE if c.num_warps == 8]


#: Every configuration the prune may keep (compiled by tests/test_sm90_fit.py).
CONFIGS = _DECODE + _LARGE


def _autotune_configs():
    return _INTERPRETER if triton_interpreting() else CONFIGS


@triton.autotune(
    configs=_autotune_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["y_ptr"],  # the kernel adds into y: every timed config must start from the same y
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _multi_task_delta_kernel(
    x_ptr, u_ptr, c_ptr, v_ptr, ids_ptr, order_ptr, y_ptr,
    M, N, K, R, T, IDS_DIV, M_BUCKET,
    stride_xm, stride_xk,
    stride_uk, stride_ur,
    stride_ct, stride_ci, stride_cj,
    stride_vn, stride_vr,
    stride_ym, stride_yn,
    stride_id,
    HAS_ORDER: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    if HAS_ORDER:
        rows = tl.load(order_ptr + offs_m, mask=m_in, other=0)
    else:
        rows = offs_m
    # int64 row offsets: rows * stride reaches 2^31 on large prefill batches.
    rows = tl.where(m_in, rows, 0).to(tl.int64)
    raw = tl.load(ids_ptr + (rows // IDS_DIV) * stride_id, mask=m_in, other=-1)
    # Out-of-range ids (possible only when the op skipped its check) read nothing and add
    # nothing; the range test runs on the ids as loaded, before any narrowing cast.
    valid = m_in & (raw >= 0) & (raw < T)
    ids = tl.where(valid, raw, -1).to(tl.int32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_ok = offs_r < R
        c_ptrs = c_ptr + offs_r[:, None] * stride_ci + offs_r[None, :] * stride_cj
        c_mask = r_ok[:, None] & r_ok[None, :]
        cur = tl.min(tl.where(valid, ids, T), axis=0)  # the block's smallest id
        if PREFETCH:
            # Issued now, waited for after the shrink: the first core's latency is hidden.
            c = tl.load(c_ptrs + cur.to(tl.int64) * stride_ct, mask=c_mask, other=0.0)

        # 1. shrink: t = x_rows @ U in fp32
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        u_ptrs = u_ptr + offs_k[:, None] * stride_uk + offs_r[None, :] * stride_ur
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                xt = tl.load(x_ptrs)
                u = tl.load(u_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0 * BLOCK_K
                xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            t = tl.dot(xt, u, t, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            u_ptrs += BLOCK_K * stride_uk

        # 2. core: s = t @ cores[id], one masked dot per distinct id of the block
        if SPLIT:
            if SCALE:
                # fp16 tops out at 65504: rows of t beyond 2^14 are divided by a power of two
                # (exact) before the split and their products multiplied back, so a large
                # x @ U gives no inf / NaN where the fp32 math is finite. Same for s below.
                t_max = tl.max(tl.abs(t), axis=1)
                t_scale = tl.where(t_max > 16384.0, tl.exp2(tl.ceil(tl.log2(tl.maximum(t_max, 16384.0)))), 1.0)
                t = t / t_scale[:, None]
            t_hi = t.to(x_ptr.dtype.element_ty)
            t_lo = (t - t_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        while cur < T:
            nxt = tl.min(tl.where(valid & (ids > cur), ids, T), axis=0)
            if PREFETCH:
                # Double buffering: the next core's load is in flight during this core's dots.
                c_next = tl.load(c_ptrs + tl.minimum(nxt, T - 1).to(tl.int64) * stride_ct, mask=c_mask, other=0.0)
            else:
                c = tl.load(c_ptrs + cur.to(tl.int64) * stride_ct, mask=c_mask, other=0.0)
            if SPLIT:
                part = tl.dot(t_hi, c)
                part = tl.dot(t_lo, c, part)
                if SCALE:
                    part = part * t_scale[:, None]
            else:
                part = tl.dot(t, c, input_precision=DOT_PRECISION)
            s = tl.where((ids == cur)[:, None], part, s)
            if PREFETCH:
                c = c_next
            cur = nxt

        # 3. expand into this program's column tiles: y[rows, n] += s @ V[n].T
        if SPLIT:
            if SCALE:
                s_max = tl.max(tl.abs(s), axis=1)
                s_scale = tl.where(s_max > 16384.0, tl.exp2(tl.ceil(tl.log2(tl.maximum(s_max, 16384.0)))), 1.0)
                s = s / s_scale[:, None]
            s_hi = s.to(x_ptr.dtype.element_ty)
            s_lo = (s - s_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
        n_tiles = tl.cdiv(N, BLOCK_N)
        per_prog = tl.cdiv(n_tiles, tl.num_programs(1))
        first = pid_n * per_prog
        last = tl.minimum(first + per_prog, n_tiles)
        for j in range(first, last):
            offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            vt = tl.load(
                v_ptr + offs_r[:, None] * stride_vr + offs_n[None, :] * stride_vn,
                mask=r_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if SPLIT:
                delta = tl.dot(s_hi, vt)
                delta = tl.dot(s_lo, vt, delta)
                if SCALE:
                    delta = delta * s_scale[:, None]
            else:
                delta = tl.dot(s, vt, input_precision=DOT_PRECISION)
            y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
            store_ok = valid[:, None] & n_ok[None, :]
            yt = tl.load(y_ptrs, mask=store_ok, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (yt + delta).to(y_ptr.dtype.element_ty), mask=store_ok)


def _m_bucket(m: int) -> int:
    return min(max(triton.next_power_of_2(m), 16), 8192)


def _n_split(M: int, N: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Column splits per row block: enough programs for two per SM, at most one per column tile."""
    target = 2 * sm_count(device) if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(N, block_n), triton.cdiv(target, triton.cdiv(M, block_m))))


def kernel_args(y, x, U, cores, V, ids, ids_div=1, order=None):
    """Positional and keyword arguments of one launch (shared with :mod:`share_kernels.kernels.aot`)."""
    M, K = x.shape
    N, R = V.shape
    T = cores.shape[0]
    block_r = max(16, triton.next_power_of_2(R))
    args = (
        x, U, cores, V, ids, order if order is not None else ids, y,
        M, N, K, R, T, ids_div, _m_bucket(M),
        x.stride(0), x.stride(1),
        U.stride(0), U.stride(1),
        cores.stride(0), cores.stride(1), cores.stride(2),
        V.stride(0), V.stride(1),
        y.stride(0), y.stride(1),
        ids.stride(0),
    )
    meta = dict(
        HAS_ORDER=order is not None,
        PREFETCH=block_r <= PREFETCH_MAX_RANK,
        BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(x.dtype),
        SPLIT=x.dtype != torch.float32,
        SCALE=x.dtype == torch.float16,
    )
    return args, meta


def multi_task_delta_(
    y: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    cores: torch.Tensor,
    V: torch.Tensor,
    ids: torch.Tensor,
    ids_div: int = 1,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the per-row low-rank term into ``y`` in place; returns ``y``.

    y (M, N) and x (M, K) of one dtype, U (K, R), cores (T, R, R), V (N, R), ids (M // ids_div,)
    integer: row i uses ``ids[i // ids_div]``; ``order`` (M,) int64, a permutation of the rows
    (rows sorted by id, for the grouped strategy) or None. Any strides; R <= MAX_FUSED_RANK.
    """
    M, K = x.shape
    N, R = V.shape
    T = cores.shape[0]
    if R > MAX_FUSED_RANK:
        raise ValueError(f"multi_task_delta_: k={R} exceeds MAX_FUSED_RANK={MAX_FUSED_RANK}")
    if M == 0 or N == 0 or T == 0:
        return y
    args, meta = kernel_args(y, x, U, cores, V, ids, ids_div, order)
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(M, meta["BLOCK_M"]),
        _n_split(M, N, meta["BLOCK_M"], meta["BLOCK_N"], x.device),
    )
    _multi_task_delta_kernel[grid](*args, **meta)
    return y
