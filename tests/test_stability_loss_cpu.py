"""stability_loss on CPU: the compiled extension's kernel (csrc/stability_loss.cpp) against a float64
evaluation, its own float tanh over a dense sweep of floats, thread-count independence, and the
pure-PyTorch fallback when the kernel is not there."""
import importlib
import warnings

import pytest
import torch

import share_kernels
from share_kernels import _ext
from share_kernels.ops.stability_loss import stability_loss_reference
from tests.test_stability_loss import check, contract_op, make, naive64, rel_err

sl = importlib.import_module("share_kernels.ops.stability_loss")  # the package exports a function of that name

pytestmark = pytest.mark.skipif(not _ext.load(), reason="the compiled extension did not load (see the warning)")

OP = "share_kernels::_stability_loss_cpu"


def test_cpu_kernel_comes_from_the_extension(monkeypatch):
    """The private op's CPU kernel is registered from stability_loss.cpp, and the public ops use it
    (the reference is not called) for fp32, fp16 and bf16."""
    assert "stability_loss.cpp" in torch._C._dispatch_dump(OP)
    assert sl._cpu_kernel_loaded()

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(sl, "stability_loss_reference", no_reference)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        A, B, P = make(3, 20, 7, dtype)
        A.requires_grad_()
        share_kernels.stability_loss(A, B, P, 2.0).backward()
        contract_op(A, B, P, 2.0).backward()
        with torch.no_grad():
            share_kernels.stability_loss(A, B, P, 2.0)


# (r, d_in, d_out, noncontig): 4097 columns = 16 tiles of 256 + 1, 59 rows = 4 row chunks of 15
# (the last of 14); r = 1; r = 70 > 64 (D formed in two slices of ranks); one column.
SHAPES = [
    (8, 4097, 59, False),
    (70, 131, 33, False),
    (1, 59, 37, False),
    (3, 300, 130, True),
    (16, 257, 70, False),
    (2, 1, 9, False),
]


@pytest.mark.parametrize("r,d_in,d_out,noncontig", SHAPES)
@pytest.mark.parametrize("fn", [share_kernels.stability_loss, contract_op], ids=["one_pass", "two_pass"])
def test_fp32_matches_float64(r, d_in, d_out, noncontig, fn):
    check(*make(r, d_in, d_out, noncontig=noncontig), alpha=3.0, fn=fn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r,d_in,d_out,noncontig", [SHAPES[0], SHAPES[2]])
def test_low_precision_within_twice_plain_pytorch(r, d_in, d_out, noncontig, dtype):
    check(*make(r, d_in, d_out, dtype, noncontig=noncontig), alpha=3.0, low_precision=True)


@pytest.mark.parametrize("alpha", [0.0, 1e4, 1e30])
def test_zero_and_saturating_alpha(alpha):
    """alpha = 0: plain sum D², G = 2D. Large alpha: both tanh are ±1 almost everywhere (the
    alpha tanh(αP) (1 - tanh²(αD)) D² term of G still has to come out right, not inf or NaN)."""
    A, B, P = make(4, 301, 67)
    if alpha == 0.0:
        check(A, B, P, alpha)
        return
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    loss = share_kernels.stability_loss(a, b, P, alpha)
    loss.backward()
    a64, b64 = A.double().requires_grad_(), B.double().requires_grad_()
    ref = naive64(a64, b64, P, alpha)
    ref.backward()
    for out, want in ((loss, ref.detach()), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert torch.isfinite(out).all()
        assert rel_err(out, want) < 2e-6, (alpha, rel_err(out, want))


def test_same_bits_for_one_and_two_threads():
    """The partition of the rows (chunks, and runs of chunks per parallel task) and the order of
    the partial sums depend only on the shape."""
    A, B, P = make(5, 1000, 1100)  # 17 row chunks of 65 rows (the last of 60) in 16 runs
    g = torch.tensor(0.7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.share_kernels._stability_loss_cpu(A, B, P, 2.5, g)
        torch.set_num_threads(2)
        two = torch.ops.share_kernels._stability_loss_cpu(A, B, P, 2.5, g)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_forward_only_returns_no_gradients_and_the_same_loss():
    A, B, P = make(6, 130, 90)
    loss, dA, dB = torch.ops.share_kernels._stability_loss_cpu(A, B, P, 2.0, None)
    assert dA is None and dB is None
    full, dA, dB = torch.ops.share_kernels._stability_loss_cpu(A, B, P, 2.0, torch.tensor(1.0))
    assert torch.equal(loss, full) and dA.shape == A.shape and dB.shape == B.shape


def test_tanh_relative_error_over_dense_float_sweep():
    """The kernel's tanh and 1 - tanh² (computed in pairs, sharing one division) against float64,
    over 3.4M floats: a grid of step 3.3e-5 over [-50, 50], 20001 consecutive floats on each side
    of 0.5 (and of -0.5), magnitudes from 1e-45 to 50 (log grid), huge ones, infinities, signed
    zeros and NaN. Each x is paired with another x of the sweep (the reversed order): a NaN
    gives NaN in its own outputs only."""
    dense = torch.linspace(-50.0, 50.0, 3_000_001)
    near_half = 0.5 + torch.arange(-10_000, 10_001) * 2.0**-24  # consecutive floats around 0.5
    mags = torch.logspace(-45, 1.7, 200_001)
    special = torch.tensor([0.0, -0.0, 1e38, -3.4e38, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([dense, near_half, -near_half, mags, -mags, special])
    t, c, u = torch.ops.share_kernels._tanh_cpu(x, x.flip(0))
    assert t[-1].isnan() and c[-1].isnan() and u[0].isnan()
    assert t[0].item() == -1.0 and u[-1].item() == -1.0  # x[0] = -50, paired with the NaN
    x, t, c, u = x[:-1], t[:-1], c[:-1], u.flip(0)[:-1]
    x64 = x.double()
    t64, c64 = torch.tanh(x64), torch.cosh(x64).pow(-2)
    nonzero = x != 0
    for out in (t, u):
        rel_t = ((out.double() - t64).abs() / t64.abs())[nonzero]
        assert rel_t.max().item() < 3e-7, (rel_t.max().item(), x[nonzero][rel_t.argmax()].item())
    normal = x.abs() < 43.5  # 1 - tanh² > 3e-38 (normal floats start at 1.2e-38)
    rel_c = ((c.double() - c64).abs() / c64)[normal]
    assert rel_c.max().item() < 1e-6, (rel_c.max().item(), x[normal][rel_c.argmax()].item())
    assert (c[~normal] <= 1e-37).all()
    zero = x == 0
    assert torch.equal(t[zero], x[zero]) and torch.equal(torch.signbit(t[zero]), torch.signbit(x[zero]))
    assert torch.equal(torch.signbit(t), torch.signbit(x))
    assert t[-2:].tolist() == [1.0, -1.0] and (c[-2:] <= 1e-37).all()


def test_nan_in_prev_delta_propagates():
    A, B, P = make(3, 70, 40)
    P[7, 11] = float("nan")
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    loss = share_kernels.stability_loss(a, b, P, 2.0)
    loss.backward()
    assert loss.isnan()
    # G is NaN at (7, 11) only: dA = Bᵀ G has column 11 NaN, dB = G Aᵀ row 7.
    assert a.grad[:, 11].isnan().all() and b.grad[7].isnan().all()
    keep_a = torch.ones_like(a.grad, dtype=torch.bool)
    keep_a[:, 11] = False
    keep_b = torch.ones_like(b.grad, dtype=torch.bool)
    keep_b[7] = False
    assert torch.isfinite(a.grad[keep_a]).all() and torch.isfinite(b.grad[keep_b]).all()


@pytest.mark.parametrize("r,d_in,d_out", [(0, 7, 5), (3, 0, 5), (3, 7, 0)])
def test_zero_sizes(r, d_in, d_out):
    A, B, P = make(max(r, 1), d_in, d_out)
    A, B = A[:r], B[:, :r]
    loss, dA, dB = torch.ops.share_kernels._stability_loss_cpu(A, B, P, 2.0, torch.tensor(1.0))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert dA.shape == (r, d_in) and dB.shape == (d_out, r)
    assert not dA.any() and not dB.any()


def test_fallback_without_the_kernel_is_the_reference(monkeypatch):
    """Without the extension (as :mod:`share_kernels._ext` records it after its one warning) every
    op runs the reference, with no second warning: the same bits as calling it."""
    monkeypatch.setattr(_ext, "state", "missing")
    monkeypatch.setattr(sl, "_cpu_kernel", None)  # decided again on the next call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not sl._cpu_kernel_loaded()
    A, B, P = make(4, 50, 30)
    a = A.clone().requires_grad_()
    loss = share_kernels.stability_loss(a, B, P, 2.0)
    loss.backward()
    ref, dA, _ = stability_loss_reference(A, B, P, 2.0, grad_out=torch.tensor(1.0))
    assert torch.equal(loss.detach(), ref) and torch.equal(a.grad, dA)
    with torch.no_grad():
        assert torch.equal(share_kernels.stability_loss(A, B, P, 2.0), ref)

