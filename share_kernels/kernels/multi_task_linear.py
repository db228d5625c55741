"""Triton kernels for Share's multi-tenant low-rank path, added in place into ``y``:

    y[i] += ((x[i] @ U) @ cores[ids[i]]) @ V.T      for rows with 0 <= ids[i] < T

and nothing for the other rows (id -1, or an unchecked out-of-range id), which are never
written. The base product ``y = F.linear(x, weight, bias)`` is cuBLAS's, computed before by the
op, so base-only rows are bit-identical to ``F.linear``.

Two launches (punica / vLLM's shrink + expand, with the core folded into the shrink):

1. ``_multi_task_core_kernel``, one program per BLOCK_M rows (in the order given by ``order``
   when rows were grouped by task): ``t = x_rows @ U`` (BLOCK_M x k, fp32 accumulation), then
   the per-row core as a **row-parallel gather**: ``s[i] = t[i] @ cores[id_i]`` with each row
   reading its own core, k fp32 FMA steps of ``t[:, j] * cores[id, j, :]`` over the whole block
   at once. The work and the loads are the same whatever the number of distinct ids in the
   block (1 or BLOCK_M): no loop over tasks. ``t`` goes through a small fp32 scratch (M, k)
   to be read back a column at a time (same program, after a barrier; L1/L2 resident); ``s``
   is written to an fp32 (M, k) buffer (one of each per K split, below).
2. ``_multi_task_expand_kernel``, one program per (BLOCK_M rows, BLOCK_N columns) tile:
   ``y_tile += s_rows @ V_tile.T`` in fp32, stored only for adapted rows. No program
   recomputes the shrink or the core: they are done once per row block, not once per column
   tile.

Bytes and FLOPs per call (M rows, K = d_in, N = d_out, s the element size, fp32 buffers):
shrink 2·M·K·k FLOPs reading x (M·K·s) and U (K·k·s once per row block); core 2·M·k² FLOPs on
the FMA units reading one k x k core per adapted row (M·k²·s, from L2 when tasks repeat: the
same per-row cost as punica's BGMV, independent of how ids are spread); the (M, k) fp32 buffers
(write t and s, read t back, read s once per column tile: about (3 + N/BLOCK_N)·M·k·4 bytes);
expand 2·M·N·k FLOPs reading V (N·k·s per row block) and y twice (M·N·s). With the base GEMM
(2·M·N·K FLOPs, W N·K·s bytes) the low-rank path adds about k/N + k/K of its FLOPs and, at
decode, (K + N)·k·s bytes next to W's N·K·s: for K = N = 4096, k = 32, 1.6 % of the bytes.

The first kernel's grid is (M / BLOCK_M) x splits: when the row blocks alone cannot fill the
GPU it splits K (:func:`~share_kernels.kernels.lowrank_linear.shrink_splits`; decode M <= 16,
K = 4096 on 132 SMs: 8 splits of 512 columns), each split multiplying its partial t by the
cores (the core is linear in t; k² more FMAs per row per split, trivial at decode), and the
expand kernel sums the partial s in a fixed order (deterministic). For
fp16/bf16 the fp32 ``s`` enters the expand dot as a hi + lo pair of the input dtype (~16
mantissa bits, as in ``kernels/lowrank_linear.py``), with fp16 rows beyond 2^14 scaled by a
power of two first. Autotune keys hold shapes only (row bucket, K or N, padded k): the work of
both kernels does not depend on the ids, so the configuration one call's ids pick is the one
any other distribution would pick.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._utils import triton_interpreting
from .lowrank_linear import CUDA_DTYPES, _block_r, _m_bucket, dot_precision, shrink_splits

#: Largest k the kernel takes; beyond it the op runs its PyTorch reference.
MAX_FUSED_RANK = 128



def _config(bm, warps, stages, **blocks):
    return triton.Config({"BLOCK_M": bm, **blocks}, num_warps=warps, num_stages=stages)


# Small, deliberate sets, compiled for sm_90 with no spill and shared memory under 227 KB, bf16
# and fp16, k <= 16 / 32 / 64 / 128, rows in order or grouped (tests/test_sm90_fit.py).
#
# Core kernel (shrink + per-row core): a skinny GEMM (k columns) and k FMA steps. Decode-sized
# batches (M <= 64) stream x and U in long K tiles; larger batches take more rows per program
# to amortise U. At k > 64 only 8 warps (t, s and the gathered core rows are BLOCK_M x k fp32).
_CORE_DECODE = [_config(16, 4, 3, BLOCK_K=128), _config(16, 4, 2, BLOCK_K=256)]
_CORE_LARGE = [_config(32, 4, 3, BLOCK_K=64), _config(64, 8, 3, BLOCK_K=64)]
# Expand kernel: y tile += s @ V tile^T, one tile per program.
_EXPAND_DECODE = [_config(16, 4, 2, BLOCK_N=64), _config(16, 4, 2, BLOCK_N=128)]
_EXPAND_LARGE = [_config(32, 4, 2, BLOCK_N=128), _config(64, 8, 2, BLOCK_N=128)]
# Under the interpreter one configuration each; small tiles so that tests on small shapes
# still cover several row blocks, K steps and column tiles.
_CORE_INTERPRETER = [_config(16, 4, 1, BLOCK_K=32)]
_EXPAND_INTERPRETER = [_config(16, 4, 1, BLOCK_N=32)]


def _prune_sets(decode, large, configs, named_args, kwargs, dtype_arg):
    if len(configs) == 1:
        return configs
    x = named_args.get(dtype_arg)
    if x is not None and getattr(x, "dtype", None) not in CUDA_DTYPES:
        raise ValueError(f"multi_task_linear kernel: {x.dtype} is not compiled for CUDA (the op routes it to cuBLAS)")
    block_r = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    kept = decode if named_args["M"] <= 64 else large
    return kept if block_r <= 64 or named_args["M"] <= 64 else [c for c in kept if c.num_warps == 8]


def _prune_core(configs, named_args, **kwargs):
    """Decode configs for M <= 64, the larger ones above (only 8 warps at k > 64); 16-bit only
    (fp32 runs cuBLAS on CUDA, see kernels/lowrank_linear.py's CUDA_DTYPES)."""
    return _prune_sets(_CORE_DECODE, _CORE_LARGE, configs, named_args, kwargs, "x_ptr")


def _prune_expand(configs, named_args, **kwargs):
    """As :func:`_prune_core`, for the expand kernel's sets."""
    return _prune_sets(_EXPAND_DECODE, _EXPAND_LARGE, configs, named_args, kwargs, "y_ptr")


#: Every configuration the prunes may keep (compiled by tests/test_sm90_fit.py).
CORE_CONFIGS = _CORE_DECODE + _CORE_LARGE
EXPAND_CONFIGS = _EXPAND_DECODE + _EXPAND_LARGE


@triton.jit
def _block_rows(offs_m, M, ids_ptr, order_ptr, stride_id, T, IDS_DIV, HAS_ORDER: tl.constexpr):
    """A row block's (in range, row index (int64), id as loaded, id valid), shared by both kernels.

    int64 row offsets: rows * stride reaches 2^31 on large prefill batches. Out-of-range ids
    (possible only when the op skipped its check) read nothing and add nothing; the range test
    runs on the ids as loaded, before any narrowing cast."""
    m_in = offs_m < M
    if HAS_ORDER:
        rows = tl.load(order_ptr + offs_m, mask=m_in, other=0)
    else:
        rows = offs_m
    rows = tl.where(m_in, rows, 0).to(tl.int64)
    raw = tl.load(ids_ptr + (rows // IDS_DIV) * stride_id, mask=m_in, other=-1)
    valid = m_in & (raw >= 0) & (raw < T)
    return m_in, rows, raw, valid


@triton.autotune(
    configs=_CORE_INTERPRETER if triton_interpreting() else CORE_CONFIGS,
    key=["M_BUCKET", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune_core},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _multi_task_core_kernel(
    x_ptr, u_ptr, c_ptr, ids_ptr, order_ptr, t_ptr, s_ptr,
    M, K, R, T, IDS_DIV, M_BUCKET, K_PER_SPLIT, stride_bs,
    stride_xm, stride_xk,
    stride_uk, stride_ur,
    stride_ct, stride_ci, stride_cj,
    stride_id,
    HAS_ORDER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)  # split of K: this program's partial t, and its partial s
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in, rows, raw, valid = _block_rows(offs_m, M, ids_ptr, order_ptr, stride_id, T, IDS_DIV, HAS_ORDER)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_ok = offs_r < R
        # 1. shrink: t = x_rows @ U in fp32, over this program's range of K
        k_begin = pid_s * K_PER_SPLIT
        k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
        u_ptrs = u_ptr + (k_begin + offs_k)[:, None] * stride_uk + offs_r[None, :] * stride_ur
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                xt = tl.load(x_ptrs)
                u = tl.load(u_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < k_end - k0
                xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            t = tl.dot(xt, u, t, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            u_ptrs += BLOCK_K * stride_uk
        # 2. core, row-parallel: s[i] = sum_j t[i, j] * cores[id_i, j, :], every row its own core.
        # t is read back a column at a time from the (M, BLOCK_R) fp32 scratch this program
        # just wrote (the barrier makes the block's writes visible to all its threads).
        # The core is linear in t: each K split multiplies its partial t by the cores, and the
        # expand kernel sums the partial s in a fixed order.
        split0 = pid_s.to(tl.int64) * stride_bs
        buf = split0 + offs_m.to(tl.int64)[:, None] * BLOCK_R + offs_r[None, :]
        tl.store(t_ptr + buf, t, mask=m_in[:, None])
        tl.debug_barrier()
        t_col = t_ptr + split0 + offs_m.to(tl.int64) * BLOCK_R
        c_rows = c_ptr + tl.where(valid, raw, 0).to(tl.int64)[:, None] * stride_ct + offs_r[None, :] * stride_cj
        c_mask = valid[:, None] & r_ok[None, :]
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, R):
            tj = tl.load(t_col + j, mask=m_in, other=0.0)
            cj = tl.load(c_rows + j * stride_ci, mask=c_mask, other=0.0).to(tl.float32)
            s += tj[:, None] * cj
        tl.store(s_ptr + buf, s, mask=m_in[:, None])


@triton.autotune(
    configs=_EXPAND_INTERPRETER if triton_interpreting() else EXPAND_CONFIGS,
    key=["M_BUCKET", "N", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune_expand},
    restore_value=["y_ptr"],  # the kernel adds into y: every timed config must start from the same y
)
@triton.jit
def _multi_task_expand_kernel(
    s_ptr, v_ptr, ids_ptr, order_ptr, y_ptr,
    M, N, R, T, IDS_DIV, M_BUCKET, SPLITS, stride_bs,
    stride_vn, stride_vr,
    stride_ym, stride_yn,
    stride_id,
    HAS_ORDER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in, rows, raw, valid = _block_rows(offs_m, M, ids_ptr, order_ptr, stride_id, T, IDS_DIV, HAS_ORDER)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * BLOCK_R + offs_r[None, :]
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in range(0, SPLITS):
            s += tl.load(s_ptrs + sp * stride_bs, mask=valid[:, None], other=0.0)
        if SPLIT:
            if SCALE:
                # fp16 tops out at 65504: rows of s beyond 2^14 are divided by a power of two
                # (exact) before the split and their products multiplied back.
                s_max = tl.max(tl.abs(s), axis=1)
                s_scale = tl.where(s_max > 16384.0, tl.exp2(tl.ceil(tl.log2(tl.maximum(s_max, 16384.0)))), 1.0)
                s = s / s_scale[:, None]
            s_hi = s.to(y_ptr.dtype.element_ty)
            s_lo = (s - s_hi.to(tl.float32)).to(y_ptr.dtype.element_ty)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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


def buffers(x: torch.Tensor, R: int, splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 (splits, M, BLOCK_R) scratch for t and the buffer for s (one slot per K split)."""
    shape = (splits, x.shape[0], _block_r(R))
    return torch.empty(shape, dtype=torch.float32, device=x.device), torch.empty(shape, dtype=torch.float32, device=x.device)


def core_kernel_args(x, U, cores, ids, t_buf, s_buf, ids_div=1, order=None):
    """Arguments of the core launch (shared with :mod:`share_kernels.kernels.aot`)."""
    M, K = x.shape
    R = U.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(K, t_buf.shape[0]), 256) * 256  # a multiple of every BLOCK_K
    args = (
        x, U, cores, ids, order if order is not None else ids, t_buf, s_buf,
        M, K, R, cores.shape[0], ids_div, _m_bucket(M), k_per_split, t_buf.stride(0),
        x.stride(0), x.stride(1),
        U.stride(0), U.stride(1),
        cores.stride(0), cores.stride(1), cores.stride(2),
        ids.stride(0),
    )
    meta = dict(HAS_ORDER=order is not None, BLOCK_R=_block_r(R), DOT_PRECISION=dot_precision(x.dtype))
    return args, meta


def expand_kernel_args(y, s_buf, V, ids, T, ids_div=1, order=None):
    """Arguments of the expand launch (shared with :mod:`share_kernels.kernels.aot`)."""
    M, N = y.shape
    R = V.shape[1]
    args = (
        s_buf, V, ids, order if order is not None else ids, y,
        M, N, R, T, ids_div, _m_bucket(M), s_buf.shape[0], s_buf.stride(0),
        V.stride(0), V.stride(1),
        y.stride(0), y.stride(1),
        ids.stride(0),
    )
    meta = dict(
        HAS_ORDER=order is not None,
        BLOCK_R=_block_r(R),
        DOT_PRECISION=dot_precision(y.dtype),
        SPLIT=y.dtype != torch.float32,
        SCALE=y.dtype == torch.float16,
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
    Two launches: the core kernel (shrink + per-row core into an fp32 (M, k) buffer), then the
    expand kernel adding ``s @ V.T`` into the adapted rows of y.
    """
    M, K = x.shape
    N, R = V.shape
    T = cores.shape[0]
    if R > MAX_FUSED_RANK:
        raise ValueError(f"multi_task_delta_: k={R} exceeds MAX_FUSED_RANK={MAX_FUSED_RANK}")
    if M == 0 or N == 0 or T == 0:
        return y
    splits = shrink_splits(M, K, x.device)
    t_buf, s_buf = buffers(x, R, splits)
    args, meta = core_kernel_args(x, U, cores, ids, t_buf, s_buf, ids_div, order)
    _multi_task_core_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]), splits)](*args, **meta)
    args, meta = expand_kernel_args(y, s_buf, V, ids, T, ids_div, order)
    _multi_task_expand_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](*args, **meta)
    return y
