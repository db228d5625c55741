"""lowrank_linear: values and every gradient against float64, on the reference (CPU) path, on
the Triton kernels through the interpreter, and on CUDA when there is one."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import share_kernels
from share_kernels.ops.lowrank_linear import lowrank_linear_reference
from tests.conftest import requires_cuda, requires_interpreter

# (dtype, fp32-path tolerance on the relative error). Low precision is judged by the 2x rule.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(shape_x, d_out, k, dtype, device="cpu", bias=True, noncontig=False, requires_grad=False):
    """Fresh random inputs; with ``noncontig`` every operand is a strided view."""
    d_in = shape_x[-1]
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if noncontig:
        x = g(*shape_x[:-1], 2 * d_in)[..., ::2]
        W = g(d_in, d_out).t()  # (d_out, d_in), column-major
        U = g(k, d_in).t()
        C = g(d_out, k).t()
        b = g(2 * d_out)[::2] if bias else None
        assert not (x.is_contiguous() or W.is_contiguous() or U.is_contiguous() or C.is_contiguous())
    else:
        x, W, U, C = g(*shape_x), g(d_out, d_in), g(d_in, k), g(k, d_out)
        b = g(d_out) if bias else None
    # Scale so both terms matter: ||x W^T|| ~ ||(x U) C||.
    W = W / d_in**0.5
    U = U / d_in**0.5
    C = C / k**0.5
    ts = [x, W, b, U, C]
    if requires_grad:
        ts = [t.detach().requires_grad_() if t is not None else None for t in ts]
    return ts


def f64(ts):
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in ts]


def check_values_and_grads(inputs, low_precision_rule):
    """Forward and all gradients of the op against float64 (autograd through the reference)."""
    ref_in = f64(inputs)
    y = share_kernels.lowrank_linear(*inputs)
    y_ref = lowrank_linear_reference(*ref_in)
    assert y.dtype == inputs[0].dtype and y.shape == y_ref.shape
    g = torch.randn_like(y_ref)
    need = [t is not None and t.requires_grad for t in inputs]
    grads = torch.autograd.grad(y, [t for t, n in zip(inputs, need) if n], g.to(y.dtype)) if any(need) else []
    grads_ref = torch.autograd.grad(y_ref, [t for t, n in zip(ref_in, need) if n], g) if any(need) else []
    outs = [(y, y_ref)] + list(zip(grads, grads_ref))
    if not low_precision_rule:
        tol = TOL[inputs[0].dtype]
        for o, r in outs:
            assert rel_err(o, r) < tol, (rel_err(o, r), tol)
        return
    # Plain PyTorch in the same dtype, against the same float64 reference.
    plain_in = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    y_plain = lowrank_linear_reference(*plain_in)
    grads_plain = torch.autograd.grad(y_plain, [t for t, n in zip(plain_in, need) if n], g.to(y.dtype)) if any(need) else []
    for (o, r), p in zip(outs, [y_plain] + list(grads_plain)):
        assert rel_err(o, r) <= 2 * rel_err(p, r) + 1e-6, (rel_err(o, r), rel_err(p, r))


CASES = [
    # (leading shape + d_in, d_out, k, bias, noncontig)
    ((59,), 37, 5, True, False),
    ((3, 19, 59), 37, 1, True, False),
    ((2, 7, 33), 67, 16, False, False),
    ((1, 64), 128, 32, True, False),
    ((5, 11, 41), 29, 3, True, True),
    ((17, 1), 5, 2, False, False),
]


@pytest.mark.parametrize("shape,d_out,k,bias,noncontig", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_path_matches_float64(shape, d_out, k, bias, noncontig, dtype):
    inputs = make(shape, d_out, k, dtype, bias=bias, noncontig=noncontig, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=False)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("shape,d_out,k,bias,noncontig", CASES)
def test_triton_interpreter_fp32(triton_cpu, shape, d_out, k, bias, noncontig):
    inputs = make(shape, d_out, k, torch.float32, bias=bias, noncontig=noncontig, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=False)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,k,bias,noncontig", CASES[:3] + CASES[4:5])
def test_triton_interpreter_low_precision(triton_cpu, shape, d_out, k, bias, noncontig, dtype):
    """fp16 and bf16 (the interpreter's bf16 dot and rounding fixed in tests/conftest.py)."""
    inputs = make(shape, d_out, k, dtype, bias=bias, noncontig=noncontig, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=True)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_low_precision_large_rank(triton_cpu, dtype):
    """k = 70 (BLOCK_R = 128), forward and every gradient, by the low-precision rule."""
    inputs = make((9, 40), 24, 70, dtype, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=True)


@requires_interpreter
@pytest.mark.interpreter
def test_kernel_launcher_stores_t_in_fp32():
    """The launcher's side output t = x @ U is fp32 and exact to fp32 rounding for fp16 inputs."""
    from share_kernels.kernels.lowrank_linear import lowrank_linear_forward

    x, W, b, U, C = make((45, 70), 33, 7, torch.float16)
    y, t = lowrank_linear_forward(x, W, b, U, C, store_t=True)
    t_ref = x.double() @ U.double()
    assert t.dtype == torch.float32 and t.shape == (45, 7)
    assert rel_err(t, t_ref) < 1e-6
    assert rel_err(y, lowrank_linear_reference(*f64([x, W, b, U, C]))) < 2e-3


@requires_interpreter
@pytest.mark.interpreter
def test_triton_only_some_inputs_require_grad(triton_cpu):
    """Frozen weight and bias (the training setting): grads for x, U, C only; and U, C without x."""
    x, W, b, U, C = make((2, 9, 40), 24, 4, torch.float32)
    for trainable in ([x, U, C], [U, C], [C], [x]):
        for t in trainable:
            t.requires_grad_()
        check_values_and_grads([x, W, b, U, C], low_precision_rule=False)
        for t in trainable:
            t.requires_grad_(False)


def test_zero_rows_and_weight_grads():
    x, W, b, U, C = make((0, 12), 8, 3, torch.float32, requires_grad=True)
    y = share_kernels.lowrank_linear(x, W, b, U, C)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.count_nonzero(b.grad) == 0 and W.grad.shape == W.shape


@requires_interpreter
@pytest.mark.interpreter
def test_opcheck_triton_path(triton_cpu):
    inputs = make((3, 5, 24), 20, 4, torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.share_kernels.lowrank_linear.default, tuple(inputs))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_reference_path(bias):
    inputs = make((4, 6, 24), 20, 4, torch.float32, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.share_kernels.lowrank_linear.default, tuple(inputs))


def test_opcheck_backward_op():
    x, W, b, U, C = make((7, 24), 20, 4, torch.float32)
    g = torch.randn(7, 20)
    for needs in ([True, False, True, True, True], [False, True, False, False, True]):
        torch.library.opcheck(torch.ops.share_kernels.lowrank_linear_backward.default, (g, x, W, U, C, needs))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    x, W, b, U, C = make((2, 5, 24), 20, 4, torch.float32)
    U.requires_grad_()
    C.requires_grad_()

    def f(x, W, b, U, C):
        return torch.relu(share_kernels.lowrank_linear(x, W, b, U, C)).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out = compiled(x, W, b, U, C)
    gU, gC = torch.autograd.grad(out, [U, C])
    x64, W64, b64, U64, C64 = f64([x, W, b, U, C])
    ref = f(x64, W64, b64, U64, C64)
    gU_ref, gC_ref = torch.autograd.grad(ref, [U64, C64])
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-5
    assert rel_err(gU, gU_ref) < 1e-5 and rel_err(gC, gC_ref) < 1e-5


def test_lora_equivalence_with_peft_convention():
    """LoRA as documented: U = A^T, C = scale * B^T gives W x + scale * B A x."""
    d_in, d_out, r, scale = 48, 40, 6, 0.5
    base = torch.nn.Linear(d_in, d_out).double()
    A = torch.randn(r, d_in, dtype=torch.float64)
    B = torch.randn(d_out, r, dtype=torch.float64)
    x = torch.randn(9, d_in, dtype=torch.float64)
    y = share_kernels.lowrank_linear(x, base.weight, base.bias, A.t(), scale * B.t())
    y_ref = base(x) + scale * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    d_in=st.integers(1, 70),
    d_out=st.integers(1, 70),
    k=st.integers(1, 20),
    bias=st.booleans(),
)
@requires_interpreter
@pytest.mark.interpreter
def test_triton_interpreter_random_shapes(lead, d_in, d_out, k, bias):
    import os

    os.environ["SHARE_KERNELS_CPU_BACKEND"] = "triton"  # hypothesis forbids function-scoped fixtures
    try:
        inputs = make((*lead, d_in), d_out, k, torch.float32, bias=bias)
        y = share_kernels.lowrank_linear(*inputs)
        assert rel_err(y, lowrank_linear_reference(*f64(inputs))) < 1e-5
    finally:
        del os.environ["SHARE_KERNELS_CPU_BACKEND"]


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_shapes_name_argument_and_shapes():
    x, W, b, U, C = make((4, 16), 8, 3, torch.float32)
    with pytest.raises(ValueError, match=r"x's last dimension.*\(4, 15\).*\(8, 16\)"):
        share_kernels.lowrank_linear(x[:, :15], W, b, U, C)
    with pytest.raises(ValueError, match=r"U must have shape \(d_in=16, k\); got U \(15, 3\)"):
        share_kernels.lowrank_linear(x, W, b, U[:15], C)
    with pytest.raises(ValueError, match=r"C must have shape \(k=3, d_out=8\); got C \(2, 8\)"):
        share_kernels.lowrank_linear(x, W, b, U, C[:2])
    with pytest.raises(ValueError, match=r"bias must have shape \(d_out=8,\); got bias \(7\)"):
        share_kernels.lowrank_linear(x, W, b[:7], U, C)
    with pytest.raises(ValueError, match=r"weight must be 2-D \(d_out, d_in\); got weight of shape \(8, 16, 1\)"):
        share_kernels.lowrank_linear(x, W[..., None], b, U, C)
    with pytest.raises(ValueError, match=r"0-d"):
        share_kernels.lowrank_linear(x[0, 0], W, b, U, C)


def test_bad_dtypes():
    x, W, b, U, C = make((4, 16), 8, 3, torch.float32)
    with pytest.raises(TypeError, match=r"same dtype.*x=float32.*U=float16"):
        share_kernels.lowrank_linear(x, W, b, U.half(), C)
    with pytest.raises(TypeError, match=r"int64 is not supported"):
        share_kernels.lowrank_linear(x.long(), W.long(), b.long(), U.long(), C.long())


# --- CUDA ---------------------------------------------------------------------------------------

CUDA_CASES = CASES + [((2, 300, 4096), 4096, 64, True, False), ((16, 4096), 4096, 16, True, False), ((1, 257), 1000, 128, False, True)]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,k,bias,noncontig", CUDA_CASES)
def test_cuda_values_and_grads(dtype, shape, d_out, k, bias, noncontig):
    inputs = make(shape, d_out, k, dtype, device="cuda", bias=bias, noncontig=noncontig, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=dtype != torch.float32)


@requires_cuda
@pytest.mark.cuda
def test_cuda_large_rank_falls_back_to_cublas():
    inputs = make((8, 96), 80, 200, torch.float32, device="cuda", requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=False)


@requires_cuda
@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    inputs = make((3, 5, 64), 48, 8, torch.bfloat16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.share_kernels.lowrank_linear.default, tuple(inputs))
    f = torch.compile(share_kernels.lowrank_linear, fullgraph=True)
    torch.testing.assert_close(f(*inputs), share_kernels.lowrank_linear(*inputs))



@requires_interpreter
@pytest.mark.interpreter
def test_triton_path_really_runs_the_kernel(triton_cpu, monkeypatch):
    """Forward and the fused dx both launch the Triton kernel (guards against a silent fallback)."""
    import share_kernels.kernels.lowrank_linear as kmod

    calls = []
    real = kmod.lowrank_linear_forward
    monkeypatch.setattr(kmod, "lowrank_linear_forward", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, W, b, U, C = make((6, 20), 12, 3, torch.float32, requires_grad=True)
    share_kernels.lowrank_linear(x, W, b, U, C).sum().backward()
    assert calls == [{}, {"store_t": True}]


@pytest.mark.parametrize("M,pool", [(1, "_DECODE"), (64, "_DECODE"), (300, "_MID"), (8192, "_PREFILL")])
@pytest.mark.parametrize("block_r", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autotune_pruning_by_shape(M, pool, block_r, dtype):
    """Decode configs for M <= 64, mid in between (BM=64 BN=64 at k = 128), prefill for
    M >= 1024: the sets tests/test_sm90_fit.py compiles without spills; fp32 is refused (the op
    sends it to cuBLAS on CUDA); the interpreter's single config stays."""
    import share_kernels.kernels.lowrank_linear as k

    args = {"M": M, "BLOCK_R": block_r, "x_ptr": torch.empty(0, dtype=dtype)}
    kept = k._prune(k.CONFIGS, args)
    want = k._MID_R128 if (pool == "_MID" and block_r > 64) else getattr(k, pool)
    assert kept == want and 1 <= len(kept) <= 2
    with pytest.raises(ValueError, match="float32"):
        k._prune(k.CONFIGS, {**args, "x_ptr": torch.empty(0)})
    assert k._prune(k._INTERPRETER, args) == k._INTERPRETER


def test_cuda_routing_fp32_and_unaligned_to_cublas(monkeypatch):
    """On a CUDA device fp32, sizes that are not multiples of 16 and x without unit stride take
    the cuBLAS path (their kernel configurations do not fit sm_90); aligned fp16 / bf16 run the
    kernel; CPU tensors under the interpreter run it whatever their shapes."""
    import importlib
    from types import SimpleNamespace

    op = importlib.import_module("share_kernels.ops.lowrank_linear")
    mop = importlib.import_module("share_kernels.ops.multi_task_linear")
    monkeypatch.setattr(op, "use_triton", lambda *ts: True)
    monkeypatch.setattr(mop, "use_triton", lambda *ts: True)

    def x(dev, dtype, stride=1):
        return SimpleNamespace(device=torch.device(dev), dtype=dtype, stride=lambda dim: stride, numel=lambda: 64,
                               dim=lambda: 2)

    U, W, V = torch.empty(64, 5), torch.empty(32, 64), torch.empty(32, 5)
    for xx, fused in [(x("cuda", torch.float32), False), (x("cuda", torch.bfloat16), True),
                      (x("cuda", torch.float16), True), (x("cpu", torch.float32), True),
                      (x("cuda", torch.bfloat16, stride=2), False)]:
        assert op._fused(xx, W, U) is fused and mop._fused(xx, U, V) is fused, (xx.device, xx.dtype)
    cuda16 = x("cuda", torch.bfloat16)
    assert not op._fused(cuda16, torch.empty(33, 64), U) and not mop._fused(cuda16, U, torch.empty(33, 5))
    assert not op._fused(cuda16, torch.empty(32, 60), torch.empty(60, 5))
    assert op._fused(x("cpu", torch.bfloat16), torch.empty(33, 60), torch.empty(60, 5))


# --- shrink once (M >= SHRINK_MIN_M): t = x @ U in its own split-K kernel, read by the GEMM ----


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,k,bias,noncontig", [CASES[1], CASES[3], ((70, 100), 48, 70, True, False)])
def test_triton_shrink_once_path(triton_cpu, monkeypatch, shape, d_out, k, bias, noncontig, dtype):
    """Every row count through the shrink + GEMM pair (threshold lowered to 1): forward and every
    gradient (the backward's dx call uses it too when dU is not needed) against float64, and the
    shrink kernel really launched, split over K (two partial sums under the interpreter)."""
    import share_kernels.kernels.lowrank_linear as kmod

    monkeypatch.setattr(kmod, "SHRINK_MIN_M", 1)
    launches = []
    real = kmod.shrink_kernel_args
    monkeypatch.setattr(kmod, "shrink_kernel_args", lambda *a: launches.append(a[3]) or real(*a))
    inputs = make(shape, d_out, k, dtype, bias=bias, noncontig=noncontig, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=dtype != torch.float32)
    assert launches and all(s == 2 for s in launches)


@requires_interpreter
@pytest.mark.interpreter
def test_triton_shrink_once_equals_fused_recompute(monkeypatch):
    """The two forward designs agree (fp32, to rounding), at the default threshold both ways:
    M = 64 runs the single fused launch, M = 65 the shrink + GEMM pair."""
    import share_kernels.kernels.lowrank_linear as kmod

    assert kmod.SHRINK_MIN_M == 65
    x, W, b, U, C = make((65, 80), 40, 12, torch.float32)
    pair, _ = kmod.lowrank_linear_forward(x, W, b, U, C)
    monkeypatch.setattr(kmod, "SHRINK_MIN_M", 10**9)
    single, _ = kmod.lowrank_linear_forward(x, W, b, U, C)
    torch.testing.assert_close(pair, single, rtol=1e-5, atol=1e-5)
    assert kmod.shrink_splits(8192, 4096, torch.device("cpu")) == 1  # enough row blocks: no split
    assert kmod.shrink_splits(65, 4096, torch.device("cpu")) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merged_weight_path(dtype):
    """W + (U C)^T rounded once to W's dtype (within half an ulp of the float64 value, plus the
    fp32 accumulation); F.linear with it equals the op (fp32: to rounding); bad shapes name both."""
    from share_kernels.ops.lowrank_linear import lowrank_merged_weight

    x, W, b, U, C = make((9, 48), 40, 6, dtype)
    Wm = lowrank_merged_weight(W, U, C)
    exact = W.double() + (U.double() @ C.double()).t()
    assert Wm.dtype == dtype and Wm.shape == W.shape
    ulp = torch.finfo(dtype).eps * exact.abs()
    acc_err = 1e-6 * (W.double().abs() + (U.double().abs() @ C.double().abs()).t())  # fp32 sums
    assert ((Wm.double() - exact).abs() <= 0.5 * ulp + acc_err + torch.finfo(dtype).tiny).all()
    if dtype == torch.float32:
        y = F.linear(x, Wm, b)
        assert rel_err(y, lowrank_linear_reference(*f64([x, W, b, U, C]))) < TOL[dtype]
    with pytest.raises(ValueError, match=r"U must be \(d_in=48, k\).*weight \(40, 48\)"):
        lowrank_merged_weight(W, U[:5], C)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out", [((3, 300), 40), ((2, 2, 512), 24)])
def test_triton_split_k_over_w_at_decode(triton_cpu, monkeypatch, shape, d_out, dtype):
    """A decode call with one tile splits K over W in two (256 columns + the rest): partial
    tiles (with their partial t·C) summed in order by the reduction kernel, bias added there;
    forward and gradients against float64 (masked and even K)."""
    import share_kernels.kernels.lowrank_linear as kmod

    reduced = []
    real = kmod.reduce_kernel_args
    monkeypatch.setattr(kmod, "reduce_kernel_args", lambda *a: reduced.append(a[0].shape[0]) or real(*a))
    inputs = make(shape, d_out, 7, dtype, requires_grad=True)
    check_values_and_grads(inputs, low_precision_rule=dtype != torch.float32)
    assert reduced and reduced[0] == 2
    assert kmod.w_splits(16, 4096, 4096, torch.device("cpu"), sms=132) == 2  # 64 tiles: 2 splits
    assert kmod.w_splits(16, 1024, 4096, torch.device("cpu"), sms=132) == 8  # 16 tiles: 8 (>= 512 columns)
    assert kmod.w_splits(65, 1024, 4096, torch.device("cpu"), sms=132) == 1  # not decode


def test_bad_ranks_are_value_errors_on_the_kernel_path(triton_cpu):
    """The wrappers decide the kernel route before the op checks its inputs: a 1-D U or V must
    still give the ValueError naming it (not an IndexError from the routing)."""
    import share_kernels as sk

    x, W = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="U must be 2-D"):
        sk.lowrank_linear(x, W, None, torch.randn(8), torch.randn(2, 6))
    with pytest.raises(ValueError, match="U must be 2-D"):
        sk.multi_task_linear(x, W, None, torch.randn(8), torch.randn(1, 2, 2), torch.randn(6, 2),
                             torch.zeros(4, dtype=torch.long))  # fmt: skip


def test_tf32_setting_read_with_either_api(monkeypatch):
    """fp32 routing reads the TF32 setting without raising after the per-backend API was used."""
    from share_kernels._utils import cuda_matmul_allows_tf32

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flag")
    old = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert cuda_matmul_allows_tf32() is True
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert cuda_matmul_allows_tf32() is False
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
