"""Hypothesis fuzzing of the public ops with malformed calls: only ValueError / TypeError come out.

Each op gets >= 1000 calls with one or two arguments broken (a non-tensor, a wrong dtype, a
wrong shape, a bad option or scalar); tiny shapes on the CPU path. Zero-size dimensions are
valid inputs: those calls must run and match the float64 reference.
"""
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import share_kernels as sk

N_CALLS = 1000
FUZZ = settings(
    max_examples=N_CALLS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TIMES = {}

NON_TENSORS = [None, 0, 1.5, float("nan"), "x", [1.0, 2.0], (3,), {"a": 1}, b"\x00", object()]
BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]


def broken_tensor(draw, t):
    """A malformed stand-in for tensor ``t``: a non-tensor, another dtype, or another shape."""
    kind = draw(st.sampled_from(["non-tensor", "dtype", "shape", "ndim"]))
    if kind == "non-tensor":
        return draw(st.sampled_from(NON_TENSORS))
    if kind == "dtype":
        dt = draw(st.sampled_from(BAD_DTYPES + [torch.float64 if t.dtype != torch.float64 else torch.float32]))
        return torch.ones(t.shape).to(dt)
    if kind == "ndim":
        nd = draw(st.sampled_from([n for n in range(5) if n != t.dim()]))
        return torch.randn(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    shape = list(t.shape)
    if not shape:
        return torch.randn(2)
    i = draw(st.integers(0, len(shape) - 1))
    shape[i] = draw(st.sampled_from([s for s in (1, 2, 3, 5, 7) if s != shape[i]]))
    return torch.randn(*shape)


def break_some(draw, args, tensor_names, scalar_bad):
    """Break one or two of ``args`` (tensors by ``broken_tensor``, scalars from ``scalar_bad``)."""
    names = list(tensor_names) + list(scalar_bad)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    args = dict(args)
    for n in chosen:
        args[n] = broken_tensor(draw, args[n]) if n in tensor_names else draw(st.sampled_from(scalar_bad[n]))
    return args, chosen


def call_expecting_clean_errors(op, fn, args, chosen, counts):
    try:
        with torch.no_grad():
            fn(**args)
    except (ValueError, TypeError):
        counts["refused"] += 1
        return
    except Exception as e:  # anything else is a bug: report the call
        raise AssertionError(f"{op}: broken {chosen} raised {type(e).__name__}: {e}") from e
    counts["ran"] += 1


def dims(draw, n):
    return [draw(st.integers(1, 4)) for _ in range(n)]


def run_fuzz(op, body):
    counts = {"refused": 0, "ran": 0}
    t0 = time.perf_counter()

    @FUZZ
    @given(st.data())
    def fuzz(data):
        body(data.draw, counts)

    fuzz()
    TIMES[op] = time.perf_counter() - t0
    print(f"fuzz {op}: {counts['refused']} refused, {counts['ran']} ran, {TIMES[op]:.1f} s")
    # only a broken shape can by chance be valid (e.g. a bias that is dropped); nearly all are refused
    assert counts["refused"] + counts["ran"] == N_CALLS and counts["refused"] >= 0.95 * N_CALLS


def test_fuzz_lowrank_linear():
    def body(draw, counts):
        n, d_in, d_out, k = dims(draw, 4)
        args = {
            "x": torch.randn(n, d_in),
            "weight": torch.randn(d_out, d_in),
            "bias": torch.randn(d_out),
            "U": torch.randn(d_in, k),
            "C": torch.randn(k, d_out),
        }
        args, chosen = break_some(draw, args, ["x", "weight", "bias", "U", "C"], {})
        if chosen == ["bias"] and args["bias"] is None:
            args["bias"] = "none"  # None is a valid bias
        call_expecting_clean_errors("lowrank_linear", sk.lowrank_linear, args, chosen, counts)

    run_fuzz("lowrank_linear", body)


def test_fuzz_multi_task_linear():
    def body(draw, counts):
        n, d_in, d_out, k, T = dims(draw, 5)
        args = {
            "x": torch.randn(n, d_in),
            "weight": torch.randn(d_out, d_in),
            "bias": torch.randn(d_out),
            "U": torch.randn(d_in, k),
            "cores": torch.randn(T, k, k),
            "V": torch.randn(d_out, k),
            "task_ids": torch.randint(-1, T, (n,)),
            "strategy": "auto",
            "check_ids": True,
        }
        scalars = {
            "strategy": ["fast", "", None, 1, "GATHER"],
            "check_ids": ["yes", None, 1.0],
            "task_ids": [torch.full((n,), T), torch.full((n,), -2), torch.zeros(n), torch.zeros(n, dtype=torch.bool)]
            + NON_TENSORS[:6],
        }
        names = ["x", "weight", "bias", "U", "cores", "V"]
        args, chosen = break_some(draw, args, names, scalars)
        if chosen == ["bias"] and args["bias"] is None:
            args["bias"] = "none"
        call_expecting_clean_errors("multi_task_linear", sk.multi_task_linear, args, chosen, counts)

    run_fuzz("multi_task_linear", body)


def _orthonormal(d, k):
    return torch.linalg.qr(torch.randn(d, k, dtype=torch.float64)).Q.float()


def test_fuzz_project_complement():
    def body(draw, counts):
        d, n = dims(draw, 2)
        k = draw(st.integers(1, d))
        args = {"X": torch.randn(d, n), "M": _orthonormal(d, k), "mode": "remove"}
        scalars = {"mode": ["keep", "", None, 0, ["remove"], "REMOVE"]}
        args, chosen = break_some(draw, args, ["X", "M"], scalars)
        call_expecting_clean_errors("project_complement", sk.project_complement, args, chosen, counts)

    run_fuzz("project_complement", body)


def test_fuzz_project_complement_grouped():
    def body(draw, counts):
        pairs = draw(st.integers(1, 3))
        Xs, Ms = [], []
        for _ in range(pairs):
            d, n = dims(draw, 2)
            Xs.append(torch.randn(d, n))
            Ms.append(_orthonormal(d, draw(st.integers(1, d))))
        how = draw(st.sampled_from(["element", "sequence", "length", "mode"]))
        args = {"Xs": Xs, "Ms": Ms, "mode": "retain"}
        if how == "element":
            which = draw(st.sampled_from(["Xs", "Ms"]))
            i = draw(st.integers(0, pairs - 1))
            args[which] = list(args[which])
            args[which][i] = broken_tensor(draw, args[which][i])
            chosen = [f"{which}[{i}]"]
        elif how == "sequence":
            which = draw(st.sampled_from(["Xs", "Ms"]))
            args[which] = draw(st.sampled_from([None, Xs[0], 3, "Xs", {"a": Xs[0]}]))
            chosen = [which]
        elif how == "length":
            args["Ms"] = Ms[:-1] if draw(st.booleans()) else Ms + [Ms[0]]
            chosen = ["Ms"]
        else:
            args["mode"] = draw(st.sampled_from(["keep", None, 1, ""]))
            chosen = ["mode"]
        call_expecting_clean_errors(
            "project_complement_grouped", sk.project_complement_grouped, args, chosen, counts
        )

    run_fuzz("project_complement_grouped", body)


def test_fuzz_stability_loss():
    def body(draw, counts):
        r, d_in, d_out = dims(draw, 3)
        args = {
            "A": torch.randn(r, d_in),
            "B": torch.randn(d_out, r),
            "prev_delta": torch.randn(d_out, d_in),
            "alpha": 1.0,
        }
        scalars = {"alpha": [float("nan"), float("inf"), -1.0, None, "1", True, 1j, torch.tensor(1.0), [1.0]]}
        args, chosen = break_some(draw, args, ["A", "B", "prev_delta"], scalars)
        call_expecting_clean_errors("stability_loss", sk.stability_loss, args, chosen, counts)

    run_fuzz("stability_loss", body)


# ----------------------------------------------------------------------------- zero-size inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def close(out, ref, dtype):
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    assert out.dtype == dtype and out.shape == ref.shape
    if ref.numel():
        assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d_in, d_out, k", [(0, 3, 4, 2), (2, 0, 4, 2), (2, 3, 0, 2), (2, 3, 4, 0), (0, 0, 0, 0)])
def test_zero_size_dimensions_work_on_every_op(dtype, n, d_in, d_out, k):
    """A zero-size batch, d_in, d_out or rank runs on every op and dtype and matches the float64
    reference (an empty product is zero: the base linear alone, or an empty output)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x, W, b, U, C = rnd(n, d_in), rnd(d_out, d_in), rnd(d_out), rnd(d_in, k), rnd(k, d_out)
    cast = [t.to(dtype) for t in (x, W, b, U, C)]
    close(sk.lowrank_linear(*cast), sk.lowrank_linear_reference(x, W, b, U, C), dtype)
    xg, Ug, Cg = (t.clone().requires_grad_() for t in (cast[0], cast[3], cast[4]))
    sk.lowrank_linear(xg, cast[1], cast[2], Ug, Cg).sum().backward()
    assert xg.grad.shape == xg.shape and Ug.grad.shape == Ug.shape and Cg.grad.shape == Cg.shape

    cores, V = rnd(3, k, k), rnd(d_out, k)
    ids = torch.randint(-1, 3, (n,), generator=g)
    with torch.no_grad():
        out = sk.multi_task_linear(*cast[:4], cores.to(dtype), V.to(dtype), ids)
    close(out, sk.multi_task_linear_reference(x, W, b, U, cores, V, ids), dtype)

    A, B, P = rnd(k, d_in), rnd(d_out, k), rnd(d_out, d_in)
    Ag, Bg = A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()
    loss = sk.stability_loss(Ag, Bg, P.to(dtype), 2.0)
    loss.backward()
    ref = sk.stability_loss_reference(A, B, P, 2.0)[0]
    assert math.isclose(float(loss), float(ref), rel_tol=2e-2, abs_tol=1e-6)
    assert Ag.grad.shape == A.shape and Bg.grad.shape == B.shape

    d, cols, kk = d_in, n, min(k, d_in)
    X, M = rnd(d, cols), torch.linalg.qr(rnd(d, kk)).Q if kk else rnd(d, 0)
    for mode in ("remove", "retain"):
        ref = sk.project_complement_reference(X, M, mode)
        close(sk.project_complement(X.to(dtype), M.to(dtype), mode), ref, dtype)
        Xs, Ms = [X.to(dtype), rnd(3, 2).to(dtype)], [M.to(dtype), rnd(3, 0).to(dtype)]
        grouped = sk.project_complement_grouped(Xs, Ms, mode)
        close(grouped[0], ref, dtype)



# ----------------------------------------------------------------------------- named arguments


def test_public_functions_name_bad_arguments(tmp_path):
    """The calls the issue found failing deep inside (or not at all) raise ValueError / TypeError
    naming the argument."""
    import torch.nn as nn

    from share_kernels.continual import ContinualLearner
    from share_kernels.continual.share import build_subspace_from_lora

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))

    def share_layer():
        return sk.ShareLinear(nn.Linear(6, 5), k=2, p=2)

    active = share_layer()
    active.add_task("a")
    active.set_task("a")
    inflora = ContinualLearner(mlp(), "inflora", target_modules=["0", "2"], r=2)
    nan = float("nan")
    cases = [
        (lambda: sk.ShareLinear(nn.Linear(6, 5), scale=None), ValueError, "scale must be a finite number"),
        (lambda: sk.ShareLinear(nn.Linear(6, 5), scale=nan), ValueError, "scale must be a finite number"),
        (lambda: active.expand(1.5), ValueError, "phi must be an int"),
        (lambda: active.expand(-1), ValueError, "phi must be an int"),
        (lambda: share_layer().add_task("a", lora_rank=0), ValueError, "lora_rank must be a positive int"),
        (lambda: share_layer().add_task("a", lora_rank=2.5), ValueError, "lora_rank must be a positive int"),
        (lambda: share_layer().add_task("__base__"), ValueError, "task_ids uses it for the base model"),
        (lambda: share_layer().add_task("t" * 250), ValueError, "250 characters, at most 100"),
        (lambda: share_layer().add_task("a/b"), ValueError, "no path separators"),
        (lambda: build_subspace_from_lora(share_layer(), [([[1.0]], [[1.0]])]), TypeError, "pair of tensors"),
        (
            lambda: build_subspace_from_lora(share_layer(), [(torch.full((2, 6), nan), torch.ones(5, 2))]),
            ValueError,
            "A holds NaN",
        ),
        (
            lambda: build_subspace_from_lora(share_layer(), [(torch.ones(2, 6).long(), torch.ones(5, 2).long())]),
            TypeError,
            "A must be floating point",
        ),
        (lambda: inflora.begin_task("a", [torch.full((4, 6), nan)]), ValueError, "hold NaN or infinite"),
        (lambda: sk.wrap(mlp(), "share", "("), ValueError, "not a valid regex"),
        (lambda: sk.wrap(mlp(), "share", ["0"], scale=None), ValueError, "scale"),
        (lambda: sk.wrap(mlp(), "pslora", ["0"], lora_alpha=nan), ValueError, "lora_alpha"),
        (lambda: sk.task_ids("model", ["a"]).__enter__(), TypeError, "model must be a torch.nn.Module"),
        (lambda: ContinualLearner("model", "share"), TypeError, "model must be a torch.nn.Module"),
        (lambda: sk.stability_loss(torch.ones(2, 3), torch.ones(4, 2), torch.ones(4, 3), None), TypeError, "alpha"),
        (lambda: sk.stability_loss(torch.ones(2, 3), torch.ones(4, 2), torch.ones(4, 3), nan), ValueError, "alpha"),
        (
            lambda: sk.lowrank_linear([1.0], torch.ones(2, 1), None, torch.ones(1, 1), torch.ones(1, 2)),
            TypeError,
            "x must be a torch.Tensor",
        ),
        (lambda: sk.project_complement(torch.ones(3, 2), torch.ones(3, 1), mode=None), TypeError, "mode must be a str"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
