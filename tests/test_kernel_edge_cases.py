"""Kernel edge cases on CPU (Triton interpreter): the bf16 interpreter fix of tests/conftest.py,
fp16 overflow of the hi/lo split, and int64 offsets past 2^31 elements."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import share_kernels
from share_kernels.ops.lowrank_linear import lowrank_linear_reference
from share_kernels.ops.multi_task_linear import multi_task_linear_reference
from tests.conftest import requires_interpreter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# --- bf16 under the interpreter ------------------------------------------------------------------


@requires_interpreter
@pytest.mark.interpreter
def test_interpreter_bf16_dot_and_cast_match_the_gpu_semantics():
    """tl.dot of bf16 tiles accumulates the exact products in fp32 (the raw interpreter multiplied
    the uint16 storage words), and fp32 -> bf16 rounds to nearest even (it truncated)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_cast(a_ptr, b_ptr, c_ptr, r_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(a_ptr + i[:, None] * N + i[None, :])
        b = tl.load(b_ptr + i[:, None] * N + i[None, :])
        c = tl.dot(a, b)
        tl.store(c_ptr + i[:, None] * N + i[None, :], c)
        tl.store(r_ptr + i[:, None] * N + i[None, :], c.to(tl.bfloat16))

    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    r = torch.empty(16, 16, dtype=torch.bfloat16)
    dot_cast[(1,)](a, b, c, r, N=16)
    want = a.double() @ b.double()
    assert rel_err(c, want) < 1e-6
    assert torch.equal(r, c.bfloat16())  # bit-identical to torch's round-to-nearest-even


# --- fp16 overflow of the hi / lo split of t = x @ U ---------------------------------------------


def _big_t_inputs(M=6, d_in=64, d_out=24, k=4):
    """|x @ U| ~ 1e5 > 65504 (fp16's largest), while y = x W^T + (x U) C stays ~1e2 to 1e3."""
    x = (torch.randn(M, d_in) * 40).half()
    W = (torch.randn(d_out, d_in) / 8).half()
    U = (torch.randn(d_in, k) * 200).half()
    C = (torch.randn(k, d_out) / 600).half()
    b = torch.randn(d_out).half()
    t = x.double() @ U.double()
    assert t.abs().max() > 65504
    return x, W, b, U, C


@requires_interpreter
@pytest.mark.interpreter
def test_lowrank_fp16_large_xU_is_finite(triton_cpu):
    """Forward and the fused dx (where t = dy C^T is the large one): no inf / NaN where the fp32
    math is finite, and as accurate as the output dtype allows."""
    x, W, b, U, C = _big_t_inputs()
    ref = lowrank_linear_reference(*(t.double() for t in (x, W, b, U, C)))
    assert ref.abs().max() < 65504
    y = share_kernels.lowrank_linear(x, W, b, U, C)
    assert torch.isfinite(y).all() and rel_err(y, ref) < 2e-3, rel_err(y, ref)

    # dx = dy W + (dy C^T) U^T with |dy C^T| > 65504 (the kernel's t in the dx call).
    Wg = (torch.randn(24, 64) / 8).half()
    Ug = (torch.randn(64, 4) / 600).half()
    Cg = (torch.randn(4, 24) * 400).half()
    xr = x.clone().requires_grad_()
    dy = (torch.randn(6, 24) * 40).half()
    assert (dy.double() @ Cg.double().t()).abs().max() > 65504
    share_kernels.lowrank_linear(xr, Wg, None, Ug, Cg).backward(dy)
    ref_dx = dy.double() @ Wg.double() + (dy.double() @ Cg.double().t()) @ Ug.double().t()
    assert ref_dx.abs().max() < 65504
    assert torch.isfinite(xr.grad).all() and rel_err(xr.grad, ref_dx) < 2e-3, rel_err(xr.grad, ref_dx)


@requires_interpreter
@pytest.mark.interpreter
def test_multi_task_fp16_large_xU_is_finite(triton_cpu):
    """Both splits of the multi-task kernel (t = x U and s = t core) survive |t| > 65504."""
    x, W, b, U, _ = _big_t_inputs()
    V = (torch.randn(24, 4) / 30).half()
    cores = (torch.randn(3, 4, 4) / 10).half()
    ids = torch.tensor([0, 1, -1, 2, 0, 2])
    ref = multi_task_linear_reference(*(t.double() for t in (x, W, b, U, cores, V)), ids)
    assert ref.abs().max() < 65504
    for strategy in ("gather", "grouped"):
        y = share_kernels.multi_task_linear(x, W, b, U, cores, V, ids, strategy=strategy)
        assert torch.isfinite(y).all() and rel_err(y, ref) < 2e-3, (strategy, rel_err(y, ref))


# --- int64 offsets: operands whose rows lie past 2^31 elements -----------------------------------

_BIG = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SHARE_KERNELS_CPU_BACKEND"] = "triton"
    sys.path.insert(0, sys.argv[1])
    import torch
    import share_kernels
    from share_kernels.ops.lowrank_linear import lowrank_linear_reference
    from share_kernels.ops.stability_loss import stability_loss_reference

    torch.manual_seed(0)
    S, ROWS = 2**22, 600  # rows 2^22 elements apart: the last ones start past element 2^31

    def strided(rows, cols, dtype):
        # ~5 GB of address space; only the touched rows become resident (a page each).
        base = torch.empty((rows - 1) * S + cols, dtype=dtype)
        t = base.as_strided((rows, cols), (S, 1))
        t.copy_(torch.randn(rows, cols, dtype=dtype))
        return t

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    # lowrank_linear: weight (600, 32) whose rows are 2^22 elements apart (rn * stride_wn).
    W = strided(ROWS, 32, torch.float16)
    x = torch.randn(5, 32, dtype=torch.float16)
    U = torch.randn(32, 4, dtype=torch.float16) / 4
    C = torch.randn(4, ROWS, dtype=torch.float16) / 4
    y = share_kernels.lowrank_linear(x, W, None, U, C)
    print("lowrank_linear", rel(y, lowrank_linear_reference(x.double(), W.double(), None, U.double(), C.double())))

    # stability_loss: prev_delta (600, 40) whose rows are 2^22 elements apart (offs_m * stride_pm).
    P = strided(ROWS, 40, torch.bfloat16)
    A = torch.randn(2, 40, dtype=torch.bfloat16)
    B = torch.randn(ROWS, 2, dtype=torch.bfloat16)
    loss = share_kernels.stability_loss(A, B, P, 2.0)
    print("stability_loss", rel(loss, stability_loss_reference(A.double(), B.double(), P.double(), 2.0)[0]))
    """
)


@requires_interpreter
@pytest.mark.interpreter
def test_offsets_past_2_pow_31_elements():
    """Real tensors with rows beyond element 2^31 (a strided view of a lazily-allocated buffer,
    so only a few MB are touched). With int32 offsets the wrapped address reads outside the
    buffer (a crash, hence the subprocess) or the wrong row."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _BIG, ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    errs = dict(line.split() for line in proc.stdout.splitlines() if line.split()[0] in ("lowrank_linear", "stability_loss"))
    assert set(errs) == {"lowrank_linear", "stability_loss"}, proc.stdout
    assert float(errs["lowrank_linear"]) < 2e-3 and float(errs["stability_loss"]) < 2e-3, errs
