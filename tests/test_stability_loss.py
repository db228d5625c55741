"""stability_loss: value and gradients against a float64 naive evaluation, on the chunked
reference (CPU), on the Triton tile kernel through the interpreter, and on CUDA when present."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import share_kernels
from share_kernels.ops.stability_loss import stability_loss_reference
from share_kernels.bench.pslora import naive_stability_loss
from tests.conftest import requires_cuda, requires_interpreter


def naive64(A, B, P, alpha):
    """What a user writes (the benchmark's baseline), in float64: the oracle (differentiated by autograd)."""
    return naive_stability_loss(A.double(), B.double(), P.double(), alpha)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(r, d_in, d_out, dtype=torch.float32, device="cpu", noncontig=False, alpha=3.0):
    """A, B, P with D and P of comparable size, so that sign agreement and opposition both occur
    and tanh is neither saturated nor linear everywhere (|alpha D| ~ 1)."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=device)  # noqa: E731
    A = (g(r, d_in) / r**0.25).to(dtype)
    B = (g(d_out, r) / r**0.25 / alpha).to(dtype)
    P = (g(d_out, d_in) / alpha).to(dtype)
    if noncontig:  # same values as strided views: A and P column-major, B every other column
        A, P = A.t().contiguous().t(), P.t().contiguous().t()
        B = torch.stack([B, torch.full_like(B, float("nan"))], -1).reshape(d_out, 2 * r)[:, ::2]
        assert not (A.is_contiguous() or B.is_contiguous() or P.is_contiguous())
    return A, B, P


def check(A, B, P, alpha, low_precision=False, upstream=1.7, fn=share_kernels.stability_loss):
    """Loss and both gradients (through autograd, scaled by an upstream grad) vs float64.
    ``fn``: the wrapper (one-pass loss and grads) or the contract op (separate backward pass)."""
    a, b = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    loss = fn(a, b, P, alpha)
    want_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    assert loss.dtype == want_dtype and loss.shape == ()
    (loss * upstream).backward()
    a64, b64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    ref = naive64(a64, b64, P, alpha)
    (ref * upstream).backward()
    assert a.grad.dtype == A.dtype and b.grad.dtype == B.dtype
    outs = [(loss, ref.detach()), (a.grad, a64.grad), (b.grad, b64.grad)]
    if not low_precision:
        # fp32: the CPU paths sum small shapes; CUDA sums d ~ 4096 in another order (DESIGN: 1e-5)
        tol = 1e-12 if A.dtype == torch.float64 else (1e-5 if A.is_cuda else 2e-6)
        for o, r in outs:
            assert rel_err(o, r) < tol, (rel_err(o, r), tol)
        return
    # Plain PyTorch in the same dtype (what a user writes), against the same float64 oracle.
    ap, bp = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    plain = naive_stability_loss(ap, bp, P, alpha)
    (plain * upstream).backward()
    for (o, r), p in zip(outs, [plain, ap.grad, bp.grad]):
        assert rel_err(o, r) <= 2 * rel_err(p, r) + 1e-6, (rel_err(o, r), rel_err(p, r))


CASES = [
    # (r, d_in, d_out, noncontig)
    (5, 59, 37, False),
    (1, 17, 3, False),
    (16, 130, 70, False),  # 130 = 2 column blocks + 2, 70 > one 64-row split
    (7, 41, 29, True),
    (3, 1, 9, False),
]


@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_path_matches_float64(r, d_in, d_out, noncontig, dtype):
    check(*make(r, d_in, d_out, dtype, noncontig=noncontig), alpha=3.0)


def contract_op(A, B, P, alpha):
    return torch.ops.share_kernels.stability_loss(A, B, P, alpha)


@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES[:4])
def test_contract_op_two_pass_autograd_matches_float64(r, d_in, d_out, noncontig):
    check(*make(r, d_in, d_out, noncontig=noncontig), alpha=3.0, fn=contract_op)


def test_no_grad_forward_and_double_backward():
    A, B, P = make(3, 11, 9)
    with torch.no_grad():
        loss = share_kernels.stability_loss(A.requires_grad_(), B, P, 2.0)
    assert loss.grad_fn is None and abs(loss.item() - naive64(A, B, P, 2.0).item()) < 1e-5 * loss.item()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(share_kernels.stability_loss(A, B, P, 2.0), [A], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (g,) = torch.autograd.grad(contract_op(A, B, P, 2.0), [A], create_graph=True)
        g.sum().backward()


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_reference_chunking_is_exact(chunk):
    """The chunked reference equals the naive formula (float64) for any chunk size."""
    A, B, P = make(4, 33, 50, torch.float64)
    g = torch.tensor(0.5, dtype=torch.float64)
    loss, dA, dB = stability_loss_reference(A, B, P, 2.0, grad_out=g, chunk_elements=chunk)
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    ref = naive64(a, b, P, 2.0)
    (ref * 0.5).backward()
    assert rel_err(loss, ref.detach()) < 1e-13
    assert rel_err(dA, a.grad) < 1e-12 and rel_err(dB, b.grad) < 1e-12
    loss_only, none_a, none_b = stability_loss_reference(A, B, P, 2.0, chunk_elements=chunk)
    assert none_a is None and none_b is None and loss_only == loss


def profiler_peak_bytes(fn) -> int:
    """Peak bytes allocated during ``fn`` from the torch profiler's records (each op's own
    allocations and frees, and allocator events outside ops, replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = top = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += ev.self_cpu_memory_usage
        top = max(top, live)
    return top


def test_reference_peak_memory_is_bounded():
    """The chunked reference's temporaries stay below a quarter of one d x d fp32 matrix; the
    naive version (autograd through the dense formula) needs several such matrices."""
    from share_kernels.bench.pslora import naive_stability_loss

    A, B, P = make(8, 512, 512, torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    full = 512 * 512 * 4
    g = torch.tensor(1.0)
    chunked = profiler_peak_bytes(lambda: stability_loss_reference(A, B, P, 2.0, grad_out=g, chunk_elements=4096))
    naive = profiler_peak_bytes(lambda: torch.autograd.grad(naive_stability_loss(A, B, P, 2.0), [A, B]))
    assert 0 < chunked < full / 4, (chunked, full)
    assert naive > 3 * full, (naive, full)


def test_zero_alpha_is_l2_and_zero_history_is_l2():
    A, B, P = make(4, 20, 12)
    D = (B.double() @ A.double())
    assert torch.allclose(share_kernels.stability_loss(A, B, P, 0.0).double(), (D**2).sum(), rtol=1e-5)
    no_history = share_kernels.stability_loss(A, B, torch.zeros_like(P), 5.0)
    assert torch.allclose(no_history.double(), (D**2).sum(), rtol=1e-5)


def test_sign_agreement_is_cheap_and_opposition_costs_double():
    """With a saturated tanh: agreeing signs cost ~0, opposing signs ~2 D²."""
    A = torch.tensor([[1.0, -2.0]])
    B = torch.tensor([[1.0], [3.0]])
    D = B @ A
    agree = share_kernels.stability_loss(A, B, D.sign(), 50.0)
    oppose = share_kernels.stability_loss(A, B, -D.sign(), 50.0)
    assert agree.item() < 1e-6
    assert abs(oppose.item() - 2 * (D**2).sum().item()) < 1e-4


def test_no_grad_needed_for_prev_delta_and_none_for_frozen():
    A, B, P = make(3, 11, 9)
    P.requires_grad_()
    b = B.clone().requires_grad_()
    loss = share_kernels.stability_loss(A, b, P, 2.0)
    (gb,) = torch.autograd.grad(loss, [b])
    assert gb.shape == B.shape
    with pytest.raises(RuntimeError):
        torch.autograd.grad(share_kernels.stability_loss(A, b, P, 2.0), [P])


# ----------------------------------------------------------------------------- Triton (interpreter)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES)
def test_triton_interpreter_fp32(triton_cpu, r, d_in, d_out, noncontig):
    check(*make(r, d_in, d_out, noncontig=noncontig), alpha=3.0)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES[:3])
def test_triton_interpreter_contract_op_fp32(triton_cpu, r, d_in, d_out, noncontig):
    check(*make(r, d_in, d_out, noncontig=noncontig), alpha=3.0, fn=contract_op)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES[:4])
def test_triton_interpreter_low_precision(triton_cpu, r, d_in, d_out, noncontig, dtype):
    """fp16 and bf16 (the interpreter's bf16 rounding fixed in tests/conftest.py)."""
    check(*make(r, d_in, d_out, dtype, noncontig=noncontig), alpha=3.0, low_precision=True)


@requires_interpreter
@pytest.mark.interpreter
@settings(max_examples=8, deadline=None)
@given(r=st.integers(1, 20), d_in=st.integers(1, 90), d_out=st.integers(1, 140), alpha=st.floats(0.0, 10.0))
def test_triton_interpreter_random_shapes(r, d_in, d_out, alpha):
    os.environ["SHARE_KERNELS_CPU_BACKEND"] = "triton"  # hypothesis and function-scoped fixtures do not mix
    try:
        check(*make(r, d_in, d_out), alpha=alpha)
    finally:
        del os.environ["SHARE_KERNELS_CPU_BACKEND"]


@requires_interpreter
@pytest.mark.interpreter
def test_triton_launcher_splits_and_partials(triton_cpu):
    """Several row splits and column blocks (both reduction levels), a rank above 16 (BLOCK_R 32),
    and the forward-only variant: all against the float64 oracle."""
    from share_kernels.kernels import stability_loss as k

    A, B, P = make(20, 150, 200)
    assert k.block_n_for(150, 32) == 64  # 3 column blocks; 200 rows -> several 64-row splits
    loss, none_a, none_b = k.stability_loss_forward(A, B, P, 3.0)
    assert none_a is None and none_b is None
    a64, b64 = A.double().requires_grad_(), B.double().requires_grad_()
    ref = naive64(a64, b64, P, 3.0)
    (ref * -0.5).backward()
    loss2, dA, dB = k.stability_loss_forward(A, B, P, 3.0, grad_out=torch.tensor(-0.5))
    assert rel_err(loss, ref.detach()) < 2e-6 and loss2 == loss
    assert dA.dtype == dB.dtype == torch.float32
    assert rel_err(dA, a64.grad) < 2e-6 and rel_err(dB, b64.grad) < 2e-6
    # Deterministic: no atomics, a fixed reduction order.
    _, dA2, dB2 = k.stability_loss_forward(A, B, P, 3.0, grad_out=torch.tensor(-0.5))
    assert torch.equal(dA, dA2) and torch.equal(dB, dB2)


@requires_interpreter
@pytest.mark.interpreter
def test_triton_path_really_runs_the_kernel(triton_cpu, monkeypatch):
    import share_kernels.kernels.stability_loss as kmod

    calls = []
    real = kmod.stability_loss_forward
    monkeypatch.setattr(kmod, "stability_loss_forward", lambda *a, **kw: calls.append(sorted(kw)) or real(*a, **kw))
    A, B, P = make(3, 20, 12)
    b = B.clone().requires_grad_()
    share_kernels.stability_loss(A, b, P, 2.0).backward()  # training: one pass, loss and grads
    assert calls == [["grad_out"]]
    with torch.no_grad():
        share_kernels.stability_loss(A, b, P, 2.0)  # forward only
    contract_op(A, b, P, 2.0).backward()  # forward pass, then the backward pass
    assert calls == [["grad_out"], [], [], ["grad_out"]]


OPS = ("stability_loss", "stability_loss_and_grad")


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("op", OPS)
def test_opcheck_triton_path(triton_cpu, op):
    A, B, P = make(4, 40, 24)
    args = (A.requires_grad_(), B.requires_grad_(), P, 2.0)
    torch.library.opcheck(getattr(torch.ops.share_kernels, op).default, args)


@pytest.mark.parametrize("op", OPS)
def test_opcheck_reference_path(op):
    A, B, P = make(4, 40, 24)
    args = (A.requires_grad_(), B.requires_grad_(), P, 2.0)
    torch.library.opcheck(getattr(torch.ops.share_kernels, op).default, args)
    args = (torch.tensor(0.3), A.detach(), B.detach(), P, 2.0)
    torch.library.opcheck(torch.ops.share_kernels.stability_loss_backward.default, args)


@pytest.mark.parametrize("fn", [share_kernels.stability_loss, contract_op], ids=["wrapper", "contract_op"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, fn):
    A, B, P = make(4, 24, 20)
    A.requires_grad_()
    B.requires_grad_()

    def f(A, B, P):
        return 0.5 * fn(A, B * 2.0, P, 3.0) + (A**2).sum()

    out = torch.compile(f, fullgraph=True, backend=backend)(A, B, P)
    gA, gB = torch.autograd.grad(out, [A, B])
    a64, b64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    ref = 0.5 * naive64(a64, b64 * 2.0, P, 3.0) + (a64**2).sum()
    rA, rB = torch.autograd.grad(ref, [a64, b64])
    assert rel_err(out, ref.detach()) < 1e-5 and rel_err(gA, rA) < 1e-5 and rel_err(gB, rB) < 1e-5


def test_bad_inputs_name_argument_and_shapes():
    A, B, P = make(4, 10, 6)
    with pytest.raises(ValueError, match=r"B must have shape \(d_out, r=4\); got A \(4, 10\) and B \(6, 3\)"):
        share_kernels.stability_loss(A, B[:, :3], P, 1.0)
    with pytest.raises(ValueError, match=r"prev_delta must have shape \(d_out=6, d_in=10\); got prev_delta \(10, 6\)"):
        share_kernels.stability_loss(A, B, P.t(), 1.0)
    with pytest.raises(ValueError, match=r"A must be 2-D \(r, d_in\); got A of shape \(40\)"):
        share_kernels.stability_loss(A.reshape(-1), B, P, 1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        share_kernels.stability_loss(A, B, P, -1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        share_kernels.stability_loss(A, B, P, float("nan"))
    with pytest.raises(TypeError, match="same dtype; got A=float32, B=float16, prev_delta=float32"):
        share_kernels.stability_loss(A, B.half(), P, 1.0)
    with pytest.raises(TypeError, match="int64 is not supported"):
        share_kernels.stability_loss(A.long(), B.long(), P.long(), 1.0)


def test_empty_shapes():
    A, B, P = make(3, 0, 5)
    a = A.clone().requires_grad_()
    loss = share_kernels.stability_loss(a, B, P, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and a.grad.shape == (3, 0)


# ----------------------------------------------------------------------------- sm_90 compile, CUDA

def test_prune_keeps_only_no_spill_configs():
    from share_kernels.kernels import stability_loss as k

    for (br, bn), ok in k._NO_SPILL.items():
        kept = k._prune(k._CONFIGS, {}, BLOCK_R=br, BLOCK_N=bn)
        assert kept and {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept} == ok
    assert k._prune(k._INTERPRETER, {}, BLOCK_R=64, BLOCK_N=128) == k._INTERPRETER
    assert k.block_n_for(4096, 16) == 128 and k.block_n_for(4096, 64) == 64 and k.block_n_for(768, 16) == 64


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("r,d_in,d_out,noncontig", CASES + [(16, 4096, 4097, False), (64, 777, 2049, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_values_and_grads(dtype, r, d_in, d_out, noncontig):
    check(*make(r, d_in, d_out, dtype, device="cuda", noncontig=noncontig), alpha=3.0,
          low_precision=dtype != torch.float32)


@requires_cuda
@pytest.mark.cuda
def test_cuda_large_rank_falls_back_and_opcheck_compile():
    check(*make(80, 100, 90, device="cuda"), alpha=2.0)
    A, B, P = make(8, 256, 192, device="cuda")
    args = (A.requires_grad_(), B.requires_grad_(), P, 2.0)
    torch.library.opcheck(torch.ops.share_kernels.stability_loss.default, args)
    f = torch.compile(share_kernels.stability_loss, fullgraph=True)
    assert torch.allclose(f(A, B, P, 2.0), share_kernels.stability_loss(A, B, P, 2.0), rtol=1e-5)
