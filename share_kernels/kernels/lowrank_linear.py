"""Triton kernels for ``y = x @ W.T + bias + (x @ U) @ C`` and their host launcher.

Two forward designs, chosen by the number of rows M (:data:`SHRINK_MIN_M`):

* **M < 65 (decode): one fused launch.** One program computes a BLOCK_M x BLOCK_N tile of y.
  Its K loop loads each x tile once and feeds it to two dots: the base product against a W
  tile and the low-rank product against a U tile, whose result ``t = x @ U`` (BLOCK_M x k)
  stays in fp32 registers. The epilogue adds ``t @ C`` and the bias and writes y once. When
  the tiles cannot fill the GPU (:func:`w_splits`: d_out = 4096 gives 64 nominal 16 x 64 tiles
  for 132 SMs, so 2 splits; d_out = 1024, 8) the K loop is **split over W**: each program
  covers one K range, writes its fp32 partial tile (its partial ``t @ C`` included: t is
  linear in x) to a workspace, and :func:`_splitk_reduce_kernel` sums the partials in a fixed
  order, adds the bias and writes y (exact up to fp32 reassociation, deterministic). W is
  still read once; the workspace adds 2·splits·M·d_out·4 bytes (M = 16, d_out = 1024, 8
  splits: 1 MB against W's 8.4 MB, mostly from L2) and one launch.
* **M >= 65: shrink once, then the GEMM.** :func:`_lowrank_shrink_kernel` forms
  ``t = x @ U`` once per row block (fp32 partial sums over ``splits`` ranges of K when the row
  blocks alone cannot fill the GPU, :func:`shrink_splits`); the GEMM (the same kernel with
  ``T_IN``) runs a plain ``x @ W.T`` main loop and adds, in its epilogue, the partial sums of t
  in a fixed order (deterministic), ``t @ C`` and the bias.

Model, d_in = d_out = 4096 (K = N), bf16 (2 bytes), H100 SXM (3.35 TB/s HBM, 989 TFLOP/s
dense bf16), against ``F.linear`` alone:

* decode M = 16: HBM bytes are W (33.6 MB) + x, U, C, y (k = 16: 0.5 MB; k = 64: 1.3 MB), so
  1.01x / 1.03x of ``F.linear``'s 33.8 MB (W, x, y): the goal (<= 1.05x) is inside the byte bound. The
  fused launch recomputes ``x @ U`` in each of the N / BLOCK_N = 64-128 column programs, which
  re-read U from L2 (k = 16: 8-17 MB; k = 64: 34-67 MB of L2 traffic next to W's 33.6 MB from
  HBM): the cost that decides the ratio. The shrink-once pair would read U once (split over 8
  K ranges, one row block) and the GEMM reads 8 partial t tiles (32 KB per program from L2),
  but adds a launch (~2-4 us outside a CUDA graph, next to ~10 us of W streaming). Which wins
  at decode needs a GPU timing; ``SHRINK_MIN_M`` is the switch to move once it is measured.
* prefill M = 8192: base 2·M·N·K = 275 GFLOP. The fused launch re-forms ``x @ U`` per column
  tile: +k/BLOCK_N of the tensor-core work (k = 64, BLOCK_N = 128: +50 %; 256: +25 %). Shrink
  once does 2·M·K·k (k/N of the base: 0.4 % at k = 16, 1.6 % at k = 64) plus the epilogue's
  hi + lo ``t @ C`` dots (2·k/K: 0.8 % / 3.1 %), and moves M·BLOCK_R·4 bytes of t per column
  tile (67 MB of L2 reads at k = 64 against 2.1 GB of x tile reads): 1.012x / 1.047x of the
  base GEMM's work, inside the 1.08x goal if the Triton main loop runs at cuBLAS's rate (no
  TMA or warp specialisation here: that, not the low-rank path, is the remaining gap).

No figure here is measured on a GPU. The same GEMM kernel computes the input gradient of the
op, ``dx = dy @ W + (dy @ C.T) @ U.T``, by being called with ``weight = W.T``, ``U = C.T``,
``C = U.T`` (strides, not copies); it can also write ``t`` (``dy @ C.T``, fp32) so the backward
reuses it for ``dU`` (that call keeps the fused design: it needs t stored anyway).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import cuda_matmul_allows_tf32, triton_interpreting

#: Largest k the fused kernel keeps in registers; beyond it the launcher is not used (the op
#: falls back to cuBLAS, see ops/lowrank_linear.py).
MAX_FUSED_RANK = 128


def _config(bm, bn, bk, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# Small, deliberate sets (every autotune candidate is one more compile on a cold cache), all
# measured to compile for sm_90 with no register spill and shared memory under the 227 KB a
# block may have, in both directions (forward, and the backward's dx call with W.T, STORE_T on
# or off), bf16 and fp16, k <= 16 / 32 / 64 / 128: tests/test_sm90_fit.py compiles them all.
#
# Decode (M <= 64): memory bound on W; small BLOCK_M and long K tiles so each program
# streams a contiguous stretch of W. Narrow N tiles give d_out/32 or d_out/64 programs,
# enough to keep every SM of an H100 pulling from HBM at d_out = 4096.
_DECODE = [
    _config(16, 32, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
]
# Between decode and prefill. BM=64 BN=128 w4 spills at k = 128 (24 B forward, 8 B dx); there
# BM=64 BN=64 takes its place.
_MID = [
    _config(64, 128, 64, 4, 4),
    _config(32, 128, 64, 4, 4),
]
_MID_R128 = [
    _config(64, 64, 64, 4, 4),
    _config(32, 128, 64, 4, 4),
]
# Prefill (M >= 1024): compute bound; large tiles amortise the k-wide U dot over BLOCK_N.
# 8 warps: with 4, BM=BN=128 spills 88-920 B at k >= 64 (the dx call first).
_PREFILL = [
    _config(128, 128, 64, 8, 3),
    _config(64, 256, 64, 8, 3),
]
# Under the interpreter one configuration only: autotuning there would run every config.
_INTERPRETER = [_config(32, 64, 32, 4, 1)]

#: dtypes the kernel runs on CUDA. fp32 does not: with torch's default ``allow_tf32=False``
#: its IEEE dots spill (0.5-31 KB per thread), exceed 227 KB of shared memory at large tiles and
#: take 10-530 s to compile per configuration; with TF32 on, cuBLAS is as fast for the base GEMM.
#: The op runs fp32 through cuBLAS (ops/lowrank_linear.py); the interpreter still runs it.
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def runs_on_cuda(dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this dtype on a GPU (else the ops use cuBLAS)."""
    return dtype in CUDA_DTYPES


def fits_cuda(x: torch.Tensor, d_in: int, d_out: int) -> bool:
    """Whether the fused kernels take this problem on a GPU: fp16 / bf16, d_in and d_out
    multiples of 16 and x with unit stride along d_in, the layouts tests/test_sm90_fit.py
    compiles. With unaligned sizes (d = 4097) loads are scalar and masked, and every
    configuration spills on sm_90 (56 B to 5 KB per thread, from k = 16 on); those problems,
    and fp32, run cuBLAS instead (ops/lowrank_linear.py, ops/multi_task_linear.py)."""
    return runs_on_cuda(x.dtype) and d_in % 16 == 0 and d_out % 16 == 0 and x.stride(-1) == 1


def _prune(configs, named_args, **kwargs):
    """The configurations for this launch: by M (decode, mid, prefill) and k, 16-bit only.

    The sets fit sm_90 in both directions (forward and dx), so the direction (``W_K_CONTIG``,
    ``STORE_T``) selects nothing here; tests/test_sm90_fit.py compiles both to keep it so.
    """
    if len(configs) == 1:
        return configs
    x = named_args.get("x_ptr")
    if x is not None and getattr(x, "dtype", None) not in CUDA_DTYPES:
        raise ValueError(f"lowrank_linear kernel: {x.dtype} is not compiled for CUDA (the op routes it to cuBLAS)")
    m = named_args["M"]
    block_r = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    if m <= 64:
        return _DECODE
    if m >= 1024:
        return _PREFILL
    return _MID if block_r <= 64 else _MID_R128


#: Every configuration the prune may keep (compiled by tests/test_sm90_fit.py).
CONFIGS = _DECODE + _MID + [c for c in _MID_R128 if c not in _MID] + _PREFILL


def _autotune_configs():
    return _INTERPRETER if triton_interpreting() else CONFIGS


@triton.autotune(
    configs=_autotune_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "W_K_CONTIG", "T_IN"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _lowrank_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, u_ptr, c_ptr, y_ptr, t_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_uk, stride_ur,
    stride_cr, stride_cn,
    stride_ym, stride_yn,
    stride_tm, stride_tr,
    stride_b,
    T_SPLITS, stride_ts, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    W_SPLIT: tl.constexpr,
    STORE_T: tl.constexpr,
    T_IN: tl.constexpr,
    W_K_CONTIG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_T: tl.constexpr,
    SCALE_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share each W column block while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Offsets past 2^31 elements (rows of a large batch, columns of a large weight) live in the
    # tile's base pointers, computed once in int64; the per-element offsets inside the tile stay
    # int32 (int64 ones per element cost registers and spilled on unaligned shapes).
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    x_ptr += row0.to(tl.int64) * stride_xm
    w_ptr += col0.to(tl.int64) * stride_wn
    c_ptr += col0.to(tl.int64) * stride_cn
    b_ptr += col0.to(tl.int64) * stride_b
    y_ptr += row0.to(tl.int64) * stride_ym + col0.to(tl.int64) * stride_yn
    t_ptr += row0.to(tl.int64) * stride_tm
    offs_m = tl.arange(0, BLOCK_M)  # local to the tile
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the end wrap to the tile's first ones instead of being masked in the K
    # loop (the wrapped values are never stored), so only the K tail needs a mask.
    rm = offs_m % (M - row0)
    rn = offs_n % (N - col0)
    r_ok = offs_r < R

    if W_SPLIT:
        # Split-K over W (decode with too few tiles for the SMs): this program's K range only;
        # the partial tile (with its partial t @ C, t being linear in x) goes to an fp32
        # workspace that _splitk_reduce_kernel sums in a fixed order.
        k_begin = tl.program_id(1).to(tl.int64) * K_PER_SPLIT
        k_len = tl.minimum(K - k_begin, K_PER_SPLIT).to(tl.int32)
        x_ptr += k_begin * stride_xk
        w_ptr += k_begin * stride_wk
        u_ptr += k_begin * stride_uk
    else:
        k_len = K
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn
    u_ptrs = u_ptr + offs_k[:, None] * stride_uk + offs_r[None, :] * stride_ur

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < k_len - k0 * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if not T_IN:
            # The one x tile feeds both products.
            if EVEN_K:
                u = tl.load(u_ptrs, mask=r_ok[None, :], other=0.0)
            else:
                u = tl.load(u_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            t = tl.dot(x, u, t, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    m_ok = offs_m < M - row0
    if T_IN:
        # t = x @ U formed once per row block by _lowrank_shrink_kernel: its split-K partial
        # sums (fp32) are added here in a fixed order (deterministic).
        tp_ptrs = t_ptr + rm[:, None] * stride_tm + offs_r[None, :] * stride_tr
        for sp in range(0, T_SPLITS):
            t += tl.load(tp_ptrs + sp * stride_ts)
    if STORE_T:
        # Before the epilogue, which rescales t in place for fp16.
        if pid_n == 0:
            t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, t, mask=m_ok[:, None] & r_ok[None, :])

    # Epilogue: add t @ C with t kept at fp32 accuracy. For fp16/bf16, C is exact in its
    # dtype, so t is split into a hi and a lo part of that dtype: two 16-bit MMAs give ~16
    # mantissa bits of t (tf32 would keep 10) and need no fp32 operand tiles.
    c_ptrs = c_ptr + offs_r[:, None] * stride_cr + rn[None, :] * stride_cn
    c = tl.load(c_ptrs, mask=r_ok[:, None], other=0.0)
    if SPLIT_T:
        if SCALE_T:
            # fp16 tops out at 65504: a row of t beyond 2^14 is split after dividing it by a
            # power of two (exact), and acc is divided by the same power around the two dots,
            # so |x @ U| > 65504 gives no inf / NaN where the fp32 math is finite.
            t_max = tl.max(tl.abs(t), axis=1)
            t_scale = tl.where(t_max > 16384.0, tl.exp2(tl.ceil(tl.log2(tl.maximum(t_max, 16384.0)))), 1.0)
            t = t / t_scale[:, None]
            acc = acc / t_scale[:, None]
        t_hi = t.to(c.dtype)
        t_lo = (t - t_hi.to(tl.float32)).to(c.dtype)
        acc = tl.dot(t_hi, c, acc)
        acc = tl.dot(t_lo, c, acc)
        if SCALE_T:
            acc = acc * t_scale[:, None]
    else:
        acc = tl.dot(t, c, acc, input_precision=DOT_PRECISION)
    if W_SPLIT:
        ws_ptrs = (t_ptr + tl.program_id(1).to(tl.int64) * stride_ts + col0.to(tl.int64) * stride_tr
                   + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tr)
        tl.store(ws_ptrs, acc, mask=m_ok[:, None] & (offs_n < N - col0)[None, :])
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn * stride_b).to(tl.float32)
            acc += bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < N - col0)[None, :])


#: From this many rows on, the forward forms t = x @ U once per row block in its own kernel
#: (:func:`_lowrank_shrink_kernel`) instead of in every column tile's K loop (see
#: :func:`lowrank_linear_forward`). Below it (decode) the single fused launch stays.
SHRINK_MIN_M = 65


def _shrink_config(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# One configuration per row bucket (no autotuning: the shrink is a small fraction of the call).
_SHRINK_MID = _shrink_config(32, 64, 4, 3)
_SHRINK_LARGE = _shrink_config(64, 64, 4, 3)
SHRINK_CONFIGS = [_SHRINK_MID, _SHRINK_LARGE]
_SHRINK_INTERPRETER = [_shrink_config(16, 32, 4, 1)]


def _prune_shrink(configs, named_args, **kwargs):
    """BLOCK_M = 32 below 1024 rows, 64 from there; 16-bit only on CUDA."""
    if len(configs) == 1:
        return configs
    x = named_args.get("x_ptr")
    if x is not None and getattr(x, "dtype", None) not in CUDA_DTYPES:
        raise ValueError(f"lowrank_linear shrink kernel: {x.dtype} is not compiled for CUDA (the op routes it to cuBLAS)")
    return [_SHRINK_LARGE if named_args["M"] >= 1024 else _SHRINK_MID]


@triton.autotune(
    configs=_SHRINK_INTERPRETER if triton_interpreting() else SHRINK_CONFIGS,
    key=["M_BUCKET", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": _prune_shrink},
)
@triton.jit
def _lowrank_shrink_kernel(
    x_ptr, u_ptr, t_ptr,
    M, K, R, M_BUCKET, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_uk, stride_ur,
    stride_ts, stride_tm,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """t_part[s] = x[rows] @ U over K range s (fp32), s = program_id(1); padded columns 0."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    k_begin = pid_s * K_PER_SPLIT
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rm = offs_m % (M - row0)
    r_ok = offs_r < R
    x_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + rm[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    u_ptrs = u_ptr + (k_begin + offs_k)[:, None] * stride_uk + offs_r[None, :] * stride_ur
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        t = tl.dot(x, u, t, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        u_ptrs += BLOCK_K * stride_uk
    t_ptrs = t_ptr + pid_s.to(tl.int64) * stride_ts + (row0 + offs_m).to(tl.int64)[:, None] * stride_tm + offs_r[None, :]
    tl.store(t_ptrs, t, mask=(offs_m < M - row0)[:, None])


def shrink_splits(M: int, K: int, device: torch.device, sms: int | None = None) -> int:
    """Splits of K for the shrink: enough programs for two per SM when the row blocks alone are
    too few, at least 512 columns of x per split. ``sms`` overrides the device's count (the
    ahead-of-time compile plans for an H100's 132). Off CUDA (the interpreter's tests): 2 up to
    224 rows, to exercise the sum of partials."""
    if sms is None and device.type == "cuda":
        from .._utils import sm_count

        sms = sm_count(device)
    if sms is None:
        return max(1, min(triton.cdiv(8, triton.cdiv(M, 32)), 2))
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(M, 32)), triton.cdiv(K, 512)))


_REDUCE_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)]


def _prune_reduce(configs, named_args, **kwargs):
    return configs


REDUCE_CONFIGS = _REDUCE_CONFIGS


@triton.autotune(configs=_REDUCE_CONFIGS, key=["N"], prune_configs_by={"early_config_prune": _prune_reduce})
@triton.jit
def _splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, MN, N, S, stride_ws, stride_b,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y (contiguous M x N) = sum over s of ws[s] (fp32, in order s = 0, 1, ...) + bias."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in range(0, S):
        acc += tl.load(ws_ptr + sp * stride_ws + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (offs % N) * stride_b, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


#: Split-K over W only for decode-sized batches (the decode configurations' BLOCK_M = 16).
W_SPLIT_MAX_M = 64


def w_splits(M: int, N: int, K: int, device: torch.device, sms: int | None = None) -> int:
    """Splits of K over W for a decode call whose tiles (16 x 64 nominal) cannot fill the GPU:
    up to one program per SM, at least 512 columns of K per split. Off CUDA (the interpreter's
    tests): 2 for a single-tile problem with K >= 64, to exercise the reduction."""
    if M > W_SPLIT_MAX_M:
        return 1
    tiles = triton.cdiv(M, 16) * triton.cdiv(N, 64)
    if sms is None and device.type == "cuda":
        from .._utils import sm_count

        sms = sm_count(device)
    if sms is None:
        return 2 if tiles <= 2 and K >= 64 else 1
    return max(1, min(sms // tiles, triton.cdiv(K, 512))) if tiles < sms // 2 else 1


def shrink_kernel_args(x, U, t_part, splits):
    """Arguments of the shrink launch (shared with :mod:`share_kernels.kernels.aot`)."""
    M, K = x.shape
    R = U.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(K, splits), 64) * 64
    args = (
        x, U, t_part,
        M, K, R, _m_bucket(M), k_per_split,
        x.stride(0), x.stride(1),
        U.stride(0), U.stride(1),
        t_part.stride(0), t_part.stride(1),
    )
    return args, dict(BLOCK_R=_block_r(R), DOT_PRECISION=dot_precision(x.dtype))


def reduce_kernel_args(ws, bias, y):
    """Arguments of the split-K reduction (shared with :mod:`share_kernels.kernels.aot`)."""
    M, N = y.shape
    args = (ws, bias if bias is not None else y, y, M * N, N, ws.shape[0], ws.stride(0),
            bias.stride(0) if bias is not None else 0)
    return args, dict(HAS_BIAS=bias is not None)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def _m_bucket(m: int) -> int:
    return min(max(triton.next_power_of_2(m), 16), 8192)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` as cuBLAS does."""
    if dtype == torch.float32 and not cuda_matmul_allows_tf32():
        return "ieee"
    return "tf32"


def kernel_args(x, weight, bias, U, C, y, t, t_part=None, ws=None):
    """Positional and keyword arguments of one launch of the fused kernel (shared by the
    launcher and by :mod:`share_kernels.kernels.aot`, which compiles the same specialisation).
    ``t`` (M, R) fp32: written (STORE_T); ``t_part`` (splits, M, BLOCK_R) fp32: the shrink's
    partial sums, read (T_IN). At most one of them."""
    M, K = x.shape
    N, R = weight.shape[0], U.shape[1]
    assert (t is not None) + (t_part is not None) + (ws is not None) <= 1
    # t: written; t_part: read; ws (splits, M, N) fp32: the split-K partial tiles, written
    t_arg = t if t is not None else (t_part[0] if t_part is not None else (ws[0] if ws is not None else y))
    parts = t_part if t_part is not None else ws
    k_per_split = triton.cdiv(triton.cdiv(K, ws.shape[0]), 128) * 128 if ws is not None else 0
    args = (
        x, weight, bias if bias is not None else y, U, C, y, t_arg,
        M, N, K, R, _m_bucket(M),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        U.stride(0), U.stride(1),
        C.stride(0), C.stride(1),
        y.stride(0), y.stride(1),
        t_arg.stride(0), t_arg.stride(1),
        bias.stride(0) if bias is not None else 0,
        t_part.shape[0] if t_part is not None else 0, parts.stride(0) if parts is not None else 0, k_per_split,
    )
    meta = dict(
        HAS_BIAS=bias is not None,
        STORE_T=t is not None,
        T_IN=t_part is not None,
        W_SPLIT=ws is not None,
        W_K_CONTIG=weight.stride(1) == 1,
        BLOCK_R=_block_r(R),
        DOT_PRECISION=dot_precision(x.dtype),
        SPLIT_T=x.dtype != torch.float32,
        SCALE_T=x.dtype == torch.float16,
    )
    return args, meta


def lowrank_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    C: torch.Tensor,
    store_t: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused kernel on 2-D operands (any strides).

    x (M, K), weight (N, K), bias (N,) or None, U (K, R), C (R, N), R <= MAX_FUSED_RANK.
    Returns y (M, N) in x's dtype and, when ``store_t``, ``t = x @ U`` (M, R) in fp32.
    """
    M, K = x.shape
    N = weight.shape[0]
    R = U.shape[1]
    if R > MAX_FUSED_RANK:
        raise ValueError(f"lowrank_linear_forward: k={R} exceeds MAX_FUSED_RANK={MAX_FUSED_RANK}")
    if x.is_cuda and x.stride(1) != 1:
        # e.g. an expanded grad_out (stride 0): the layouts tests/test_sm90_fit.py compiles.
        x = x.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.empty((M, R), device=x.device, dtype=torch.float32) if store_t else None
    if M == 0 or N == 0:
        if t is not None:
            t.zero_()
        return y, t
    t_part = None
    if t is None and M >= SHRINK_MIN_M:
        # Shrink once: t = x @ U per row block (split over K when the row blocks are few),
        # then the GEMM reads it in its epilogue instead of re-forming it per column tile.
        splits = shrink_splits(M, K, x.device)
        t_part = torch.empty((splits, M, _block_r(R)), device=x.device, dtype=torch.float32)
        s_args, s_meta = shrink_kernel_args(x, U, t_part, splits)
        _lowrank_shrink_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]), splits)](*s_args, **s_meta)
    splits = w_splits(M, N, K, x.device) if t is None and t_part is None else 1
    if splits > 1:
        ws = torch.empty((splits, M, N), device=x.device, dtype=torch.float32)
        args, meta = kernel_args(x, weight, bias, U, C, y, None, None, ws)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        _lowrank_linear_fwd_kernel[grid](*args, **meta)
        r_args, r_meta = reduce_kernel_args(ws, bias, y)
        _splitk_reduce_kernel[lambda m: (triton.cdiv(M * N, m["BLOCK"]),)](*r_args, **r_meta)
        return y, t
    args, meta = kernel_args(x, weight, bias, U, C, y, t, t_part)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _lowrank_linear_fwd_kernel[grid](*args, **meta)
    return y, t
