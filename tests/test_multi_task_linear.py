"""multi_task_linear: values against a float64 Python-loop reference, base rows bit-identical to
F.linear, both kernel strategies through the Triton interpreter, the op contract (bad inputs,
inference only, opcheck, torch.compile), ShareLinear and the task_ids context manager, and CUDA
(graphs included) when there is one."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import share_kernels
from share_kernels.nn import ShareLinear
from share_kernels.ops.multi_task_linear import choose_strategy, multi_task_linear_reference
from tests.conftest import requires_cuda, requires_interpreter

mtl = share_kernels.multi_task_linear


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make(shape_x, d_out, k, T, dtype, device="cpu", bias=True, noncontig=False):
    """x, W, b, U, cores, V: fresh random, scaled so base and low-rank terms are both O(1)."""
    d_in = shape_x[-1]
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if noncontig:
        x = g(*shape_x[:-1], 2 * d_in)[..., ::2]
        W, U, V = g(d_in, d_out).t(), g(k, d_in).t(), g(k, d_out).t()
        cores = g(T, k, k).transpose(1, 2)
        b = g(2 * d_out)[::2] if bias else None
        assert not any(t.is_contiguous() for t in (x, W, U, V)) and (k == 1 or not cores.is_contiguous())
    else:
        x, W, U, V, cores = g(*shape_x), g(d_out, d_in), g(d_in, k), g(d_out, k), g(T, k, k)
        b = g(d_out) if bias else None
    return [x, W / d_in**0.5, b, U / d_in**0.5, cores / k**0.5, V]


def make_ids(x, T, per_sequence, device="cpu", noncontig=False):
    """Ids in [-1, T) with every kind present when there is room: -1 rows and several tasks."""
    shape = x.shape[:1] if per_sequence else x.shape[:-1]
    if noncontig and len(shape):
        ids = torch.randint(-1, T, (*shape[:-1], 2 * shape[-1]), device=device)[..., ::2]
    else:
        ids = torch.randint(-1, T, shape, device=device)
    flat = ids.reshape(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = -1, T - 1  # a write through the view when ids is contiguous
        ids = flat.view(shape) if ids.is_contiguous() else ids
    return ids


def f64(ts):
    return [t.double() if t is not None else None for t in ts]


def row_ids(ids, x):
    """Per-row ids (x.shape[:-1]) from per-row or per-sequence ids."""
    return ids.reshape(ids.shape + (1,) * (x.dim() - 1 - ids.dim())).expand(x.shape[:-1])


def check(inputs, ids, low_precision, **kw):
    """Values against float64, and base rows bit-identical to F.linear in the inputs' dtype."""
    with torch.no_grad():
        y = mtl(*inputs, ids, **kw)
    ref = multi_task_linear_reference(*f64(inputs), ids)
    x, W, b = inputs[:3]
    assert y.shape == (*x.shape[:-1], W.shape[0]) and y.dtype == x.dtype
    base = row_ids(ids, x) < 0
    assert torch.equal(y[base], F.linear(x, W, b)[base])
    if not low_precision:
        assert rel_err(y, ref) < 1e-5, rel_err(y, ref)
    else:
        plain = multi_task_linear_reference(*inputs, ids)
        assert rel_err(y, ref) <= 2 * rel_err(plain, ref) + 1e-6, (rel_err(y, ref), rel_err(plain, ref))
    return y


CASES = [
    # (leading shape + d_in, d_out, k, T, bias, noncontig)
    ((41, 59), 37, 5, 4, True, False),
    ((3, 7, 33), 29, 1, 3, True, False),
    ((2, 9, 24), 67, 16, 5, False, False),
    ((5, 6, 41), 19, 3, 7, True, True),
    ((1, 20), 17, 8, 2, False, False),
]


@pytest.mark.parametrize("shape,d_out,k,T,bias,noncontig", CASES)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_reference_path_fp32(shape, d_out, k, T, bias, noncontig, per_sequence):
    inputs = make(shape, d_out, k, T, torch.float32, bias=bias, noncontig=noncontig)
    check(inputs, make_ids(inputs[0], T, per_sequence, noncontig=noncontig), low_precision=False)


def test_reference_is_the_python_loop():
    """The op's reference equals the definition, row by row, in float64."""
    x, W, b, U, cores, V = make((3, 5, 11), 7, 3, 4, torch.float64)
    ids = make_ids(x, 4, per_sequence=False)
    y = multi_task_linear_reference(x, W, b, U, cores, V, ids)
    for i in range(3):
        for j in range(5):
            t = int(ids[i, j])
            want = F.linear(x[i, j], W, b) + (((x[i, j] @ U) @ cores[t]) @ V.t() if t >= 0 else 0)
            torch.testing.assert_close(y[i, j], want, rtol=1e-12, atol=1e-12)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("shape,d_out,k,T,bias,noncontig", CASES)
def test_triton_interpreter_fp32(triton_cpu, shape, d_out, k, T, bias, noncontig, per_sequence, strategy):
    inputs = make(shape, d_out, k, T, torch.float32, bias=bias, noncontig=noncontig)
    check(inputs, make_ids(inputs[0], T, per_sequence, noncontig=noncontig), False, strategy=strategy)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,k,T,bias,noncontig", CASES[:1] + CASES[3:4])
def test_triton_interpreter_low_precision(triton_cpu, shape, d_out, k, T, bias, noncontig, strategy, dtype):
    """fp16 and bf16 (the interpreter's bf16 dot and rounding fixed in tests/conftest.py)."""
    inputs = make(shape, d_out, k, T, dtype, bias=bias, noncontig=noncontig)
    check(inputs, make_ids(inputs[0], T, per_sequence=False), True, strategy=strategy)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_large_rank_without_prefetch(triton_cpu, strategy, dtype):
    """k > 64: the kernel loads each core when it needs it instead of double-buffering."""
    inputs = make((2, 9, 20), 15, 70, 3, dtype, bias=True)
    check(inputs, make_ids(inputs[0], 3, per_sequence=False), dtype != torch.float32, strategy=strategy)


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
def test_triton_all_rows_one_task_equals_single_task_path(triton_cpu, strategy):
    """Every row on task t: the same as lowrank_linear with C = cores[t] V^T (both near float64)."""
    x, W, b, U, cores, V = make((2, 19, 45), 38, 6, 3, torch.float32)
    for t in range(3):
        ids = torch.full((2, 19), t)
        with torch.no_grad():
            y = mtl(x, W, b, U, cores, V, ids, strategy=strategy)
        single = share_kernels.lowrank_linear(x, W, b, U, cores[t] @ V.t())
        ref = share_kernels.lowrank_linear(*f64([x, W, b, U, cores[t] @ V.t()]))
        assert rel_err(y, single) < 2e-6 and rel_err(y, ref) < 1e-5


@requires_interpreter
@pytest.mark.interpreter
def test_triton_path_really_runs_the_kernel(triton_cpu, monkeypatch):
    """auto / gather launch the kernel in row order, grouped with rows sorted by id."""
    import share_kernels.kernels.multi_task_linear as kmod

    calls = []
    real = kmod.multi_task_delta_
    monkeypatch.setattr(kmod, "multi_task_delta_", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, W, b, U, cores, V = make((4, 6, 20), 12, 3, 5, torch.float32)
    ids = make_ids(x, 5, per_sequence=False)
    seq_ids = torch.tensor([2, -1, 0, 2])
    with torch.no_grad():
        mtl(x, W, b, U, cores, V, ids)
        mtl(x, W, b, U, cores, V, ids, strategy="grouped")
        mtl(x, W, b, U, cores, V, seq_ids, strategy="grouped")
    assert [c["order"] is None for c in calls] == [True, False, False]
    assert calls[0]["ids_div"] == 1 and calls[2]["ids_div"] == 6
    sorted_ids = ids.reshape(-1)[calls[1]["order"]]
    assert torch.equal(sorted_ids, ids.reshape(-1).sort().values)
    # per-sequence grouping keeps each sequence's rows together, sequences sorted by id
    assert torch.equal(calls[2]["order"].view(4, 6)[:, 0] // 6, torch.tensor([1, 2, 0, 3]))


@requires_interpreter
@pytest.mark.interpreter
def test_triton_edge_cases(triton_cpu):
    x, W, b, U, cores, V = make((37, 26), 21, 4, 3, torch.float32)
    with torch.no_grad():
        # all rows base: F.linear exactly
        assert torch.equal(mtl(x, W, b, U, cores, V, torch.full((37,), -1)), F.linear(x, W, b))
        # no tasks at all
        assert torch.equal(mtl(x, W, b, U, cores[:0], V, torch.full((37,), -1)), F.linear(x, W, b))
        # zero rows, 1-D x
        assert mtl(x[:0], W, b, U, cores, V, torch.zeros(0, dtype=torch.long)).shape == (0, 21)
        y1 = mtl(x[5], W, b, U, cores, V, torch.tensor(2))
        torch.testing.assert_close(y1, multi_task_linear_reference(x[5], W, b, U, cores, V, torch.tensor(2)))
        # int32 ids; unchecked out-of-range ids add nothing (the documented policy)
        ids = make_ids(x, 3, False)
        check([x, W, b, U, cores, V], ids.int(), False)
        bad = ids.clone()
        bad[3], bad[4] = 3, -7
        bad[5], bad[6] = 2**32, 2**32 + 1  # would wrap to 0 and 1 if narrowed before the range test
        y = mtl(x, W, b, U, cores, V, bad, check_ids=False)
        assert torch.equal(y[3:7], F.linear(x, W, b)[3:7])
        ok = torch.ones(37, dtype=torch.bool)
        ok[3:7] = False
        assert torch.equal(y[ok], mtl(x, W, b, U, cores, V, ids)[ok])


@settings(max_examples=8, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    d_in=st.integers(1, 50),
    d_out=st.integers(1, 50),
    k=st.integers(1, 20),
    T=st.integers(1, 9),
    per_sequence=st.booleans(),
    strategy=st.sampled_from(["gather", "grouped"]),
)
@requires_interpreter
@pytest.mark.interpreter
def test_triton_interpreter_random_shapes(lead, d_in, d_out, k, T, per_sequence, strategy):
    os.environ["SHARE_KERNELS_CPU_BACKEND"] = "triton"  # hypothesis forbids function-scoped fixtures
    try:
        inputs = make((*lead, d_in), d_out, k, T, torch.float32)
        check(inputs, make_ids(inputs[0], T, per_sequence and len(lead) > 1), False, strategy=strategy)
    finally:
        del os.environ["SHARE_KERNELS_CPU_BACKEND"]


def test_choose_strategy_rule():
    """The row-parallel core costs the same however ids are spread: sorting never pays its launch."""
    for rows, T, run in ((16, 1024, 1), (4096, 16, 1), (4096, 1024, 1), (4096, 1, 1), (256, 1024, 1), (64, 4, 32)):
        assert choose_strategy(rows, T, run) == "gather"


# --- the op contract -----------------------------------------------------------------------------


def test_bad_inputs_name_argument_and_shapes():
    x, W, b, U, cores, V = make((4, 16), 8, 3, 2, torch.float32)
    ok = torch.tensor([0, 1, -1, 1])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\[-1, T=2\).*\[0, 2\]"):
            mtl(x, W, b, U, cores, V, torch.tensor([0, 2, 0, 0]))
        with pytest.raises(ValueError, match=r"\[-1, T=2\).*\[-2, 1\]"):
            mtl(x, W, b, U, cores, V, torch.tensor([0, -2, 1, 0]))
        with pytest.raises(ValueError, match=r"task_ids must have shape x.shape\[:-1\] = \(4,\).*got task_ids \(3\)"):
            mtl(x, W, b, U, cores, V, ok[:3])
        with pytest.raises(ValueError, match=r"task_ids must have shape"):
            mtl(x.view(2, 2, 16), W, b, U, cores, V, ok)
        with pytest.raises(TypeError, match="integer"):
            mtl(x, W, b, U, cores, V, ok.float())
        with pytest.raises(ValueError, match=r"cores must have shape \(T, k=3, k=3\); got cores \(2, 3, 2\)"):
            mtl(x, W, b, U, cores[..., :2], V, ok)
        with pytest.raises(ValueError, match=r"V must have shape \(d_out=8, k=3\); got V \(8, 2\)"):
            mtl(x, W, b, U, cores, V[:, :2], ok)
        with pytest.raises(ValueError, match=r"x's last dimension"):
            mtl(x[:, :15], W, b, U, cores, V, ok)
        with pytest.raises(TypeError, match="same dtype"):
            mtl(x.half(), W, b, U, cores, V, ok)
        with pytest.raises(ValueError, match="strategy must be one of"):
            mtl(x, W, b, U, cores, V, ok, strategy="sorted")


@requires_interpreter
@pytest.mark.interpreter
def test_bad_ids_on_the_triton_path(triton_cpu):
    x, W, b, U, cores, V = make((4, 16), 8, 3, 2, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[-1, T=2\)"):
        mtl(x, W, b, U, cores, V, torch.tensor([0, 2, 0, 0]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inference_only(backend, monkeypatch):
    if backend == "triton":
        if torch.cuda.is_available():
            pytest.skip("the Triton path on CPU needs the interpreter; CUDA runs it in test_cuda_*")
        monkeypatch.setenv("SHARE_KERNELS_CPU_BACKEND", "triton")
    x, W, b, U, cores, V = make((5, 12), 8, 3, 2, torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0])
    for t in (x, cores, U):
        t.requires_grad_(True)
        with pytest.raises(RuntimeError, match="inference-only"):
            mtl(x, W, b, U, cores, V, ids)
        with pytest.raises(RuntimeError, match="inference-only"):  # the raw op too
            torch.ops.share_kernels.multi_task_linear(x, W, b, U, cores, V, ids)
        with torch.no_grad():
            mtl(x, W, b, U, cores, V, ids)
        with torch.inference_mode():
            mtl(x, W, b, U, cores, V, ids)
        t.requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck_reference_path(bias, per_sequence):
    x, W, b, U, cores, V = make((3, 5, 24), 20, 4, 3, torch.float32, bias=bias)
    ids = make_ids(x, 3, per_sequence)
    torch.library.opcheck(torch.ops.share_kernels.multi_task_linear.default, (x, W, b, U, cores, V, ids))


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
def test_opcheck_triton_path(triton_cpu, strategy):
    x, W, b, U, cores, V = make((3, 5, 24), 20, 4, 3, torch.float32)
    ids = make_ids(x, 3, False)
    torch.library.opcheck(
        torch.ops.share_kernels.multi_task_linear.default, (x, W, b, U, cores, V, ids), {"strategy": strategy}
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    x, W, b, U, cores, V = make((2, 5, 24), 20, 4, 3, torch.float32)
    ids = make_ids(x, 3, False)

    def f(x, W, b, U, cores, V, ids):
        return torch.relu(mtl(x, W, b, U, cores, V, ids)) * 2

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(x, W, b, U, cores, V, ids)
        out2 = compiled(x, W, b, U, cores, V, ids.flip(-1))  # new ids, same graph
    ref = f(*f64([x, W, b, U, cores, V]), ids)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out2, f(*f64([x, W, b, U, cores, V]), ids.flip(-1))) < 1e-5


# --- ShareLinear and the task_ids context manager -------------------------------------------------


def share_layer(d_in=13, d_out=11, k=4, tasks=("a", "b", "c"), dtype=torch.float64):
    layer = ShareLinear(nn.Linear(d_in, d_out).to(dtype), k=k, p=2)
    for t in tasks:
        layer.add_task(t)
        with torch.no_grad():
            layer.eps_a[t].normal_()
            layer.eps_b[t].normal_()
    layer.set_task(None)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_share_linear_all_rows_one_task_equals_set_task(dtype, monkeypatch):
    if dtype == torch.float32 and not torch.cuda.is_available():
        monkeypatch.setenv("SHARE_KERNELS_CPU_BACKEND", "triton")  # fp32 through the kernel
    layer = share_layer(d_in=40, d_out=33, dtype=dtype)
    x = torch.randn(3, 7, 40, dtype=dtype)
    with torch.no_grad():
        for t, name in enumerate(layer.tasks):
            multi = layer(x, task_ids=torch.full((3,), t))
            layer.set_task(name)
            single = layer(x)
            layer.set_task(None)
            assert rel_err(multi, single) < (1e-12 if dtype == torch.float64 else 1e-5)
        assert torch.equal(layer(x, task_ids=torch.full((3, 7), -1)), layer.base_layer(x))


def test_share_linear_cores_is_one_batched_product():
    layer = share_layer()
    cores = layer.cores()
    for t, name in enumerate(layer.tasks):
        want = layer.scale * layer.eps_a[name] @ layer.eps_b[name].t()
        torch.testing.assert_close(cores[t], want, rtol=1e-12, atol=1e-12)


def wrapped_model(dtype=torch.float64):
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 5)).to(dtype)
    share_kernels.wrap(model, "share", target_modules=["0", "2"], k=4, p=2)
    for t in ("a", "b", "c"):
        for layer in (model[0], model[2]):
            layer.add_task(t)
            with torch.no_grad():
                layer.eps_a[t].normal_()
                layer.eps_b[t].normal_()
    return model


def per_task_outputs(model, x):
    outs = {}
    for name in [None, "a", "b", "c"]:
        for layer in (model[0], model[2]):
            layer.set_task(name)
        outs[name] = model(x)
    for layer in (model[0], model[2]):
        layer.set_task(None)
    return outs


def test_task_ids_context_manager_with_names_and_base():
    model = wrapped_model()
    x = torch.randn(6, 3, 12, dtype=torch.float64)
    with torch.no_grad():
        outs = per_task_outputs(model, x)
        names = ["c", "__base__", "a", "b", "__base__", "a"]
        with share_kernels.task_ids(model, names) as m:
            assert m is model
            mixed = model(x)
        with share_kernels.task_ids(model, torch.tensor([2, -1, 0, 1, -1, 0])):
            mixed_ids = model(x)
        per_token = [["a", "__base__", "c"]] * 6
        with share_kernels.task_ids(model, per_token):
            mixed_tok = model(x)
        assert torch.equal(model(x), outs[None])  # hooks removed
    assert torch.equal(mixed, mixed_ids)
    for i, n in enumerate(names):
        want = outs[None if n == "__base__" else n][i]
        if n == "__base__":
            assert torch.equal(mixed[i], want)
        else:
            assert rel_err(mixed[i], want) < 1e-12
    for j, n in enumerate(["a", None, "c"]):
        assert rel_err(mixed_tok[:, j], outs[n][:, j]) < 1e-12


def test_task_ids_names_are_converted_per_layer():
    """A layer whose tasks are in another order still runs the named task."""
    model = wrapped_model()
    x = torch.randn(4, 12, dtype=torch.float64)
    layer = model[2]
    # reorder layer 2's tasks: c, a, b (ids differ from layer 0's)
    tasks = {t: layer.task_tensors(t) for t in ("c", "a", "b")}
    layer.load_adapter_state(layer.shared_tensors(), tasks)
    with torch.no_grad():
        outs = per_task_outputs(model, x)
        with share_kernels.task_ids(model, ["b", "c", "a", "__base__"]):
            mixed = model(x)
    for i, n in enumerate(["b", "c", "a", None]):
        assert rel_err(mixed[i], outs[n][i]) < 1e-12


def test_task_ids_context_manager_rejects_bad_ids():
    model = wrapped_model()
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        with share_kernels.task_ids(model, ["a", "zz", "b"]):
            pass
    with pytest.raises(ValueError, match=r"\[-1, T=3\)"):
        with share_kernels.task_ids(model, torch.tensor([0, 3, 1])):
            pass
    with pytest.raises(TypeError, match="integer"):
        with share_kernels.task_ids(model, torch.tensor([0.0, 1.0, 1.0])):
            pass
    with pytest.raises(TypeError, match="task names"):
        with share_kernels.task_ids(model, ["a", 1, "b"]):
            pass
    with pytest.raises(TypeError, match="integer tensor or a list"):
        with share_kernels.task_ids(model, "a"):
            pass
    with torch.no_grad(), pytest.raises(ValueError, match="task_ids must have shape"):
        with share_kernels.task_ids(model, ["a", "b"]):
            model(x)
    with pytest.raises(RuntimeError, match="inference-only"):
        model[0].set_task("a")  # makes a's coefficients trainable
        with share_kernels.task_ids(model, ["a", "b", "c"]):
            model(x)


@pytest.mark.parametrize("M", [1, 64, 65, 4096])
@pytest.mark.parametrize("block_r,dtype", [(16, torch.bfloat16), (32, torch.float16), (64, torch.bfloat16), (128, torch.float16)])
def test_autotune_pruning(M, block_r, dtype):
    """Both kernels: decode configs for M <= 64, the larger ones above (8 warps only at k > 64):
    the sets tests/test_sm90_fit.py compiles without spills; fp32 is refused (cuBLAS on CUDA);
    the single interpreter config untouched."""
    import share_kernels.kernels.multi_task_linear as mk

    for prune, configs, decode, large, arg in (
        (mk._prune_core, mk.CORE_CONFIGS, mk._CORE_DECODE, mk._CORE_LARGE, "x_ptr"),
        (mk._prune_expand, mk.EXPAND_CONFIGS, mk._EXPAND_DECODE, mk._EXPAND_LARGE, "y_ptr"),
    ):
        args = {"M": M, "BLOCK_R": block_r, arg: torch.empty(0, dtype=dtype)}
        kept = prune(configs, args)
        assert kept and all(c in (decode if M <= 64 else large) for c in kept)
        if M > 64 and block_r > 64:
            assert all(c.num_warps == 8 for c in kept)
        with pytest.raises(ValueError, match="float32"):
            prune(configs, {**args, arg: torch.empty(0)})
        assert prune(configs[:1], args) == configs[:1]


def test_autotune_keys_are_shapes_only():
    """No key can carry the ids (their count, spread or values): a configuration timed on one
    call's ids is the right one for any other distribution of the same shape."""
    import share_kernels.kernels.multi_task_linear as mk

    assert list(mk._multi_task_core_kernel.keys) == ["M_BUCKET", "K", "BLOCK_R"]
    assert list(mk._multi_task_expand_kernel.keys) == ["M_BUCKET", "N", "BLOCK_R"]


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("strategy", ["gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_many_distinct_tasks_in_one_block(triton_cpu, strategy, dtype):
    """Every row of every block on its own task (T = 80 > rows), a few -1 rows among them: the
    row-parallel core gives each row its own core (against float64), base rows stay F.linear."""
    x, W, b, U, cores, V = make((2, 19, 40), 33, 12, 80, dtype)
    ids = torch.randperm(80)[:38].view(2, 19)
    ids[0, 3] = ids[1, 17] = -1
    y = check([x, W, b, U, cores, V], ids, dtype != torch.float32, strategy=strategy)
    # one row at a time through the same kernel: a row's result does not depend on its neighbours
    if dtype == torch.float32:
        with torch.no_grad():
            for i, j in ((0, 0), (1, 9)):
                alone = mtl(x[i, j : j + 1], W, b, U, cores, V, ids[i, j : j + 1])
                torch.testing.assert_close(alone[0], y[i, j], rtol=1e-5, atol=1e-5)


@requires_interpreter
@pytest.mark.interpreter
def test_triton_same_ids_spread_or_identical_give_the_same_rows(triton_cpu):
    """The per-row result does not depend on how many distinct ids share the row's block."""
    x, W, b, U, cores, V = make((48, 24), 20, 8, 48, torch.float32)
    with torch.no_grad():
        spread = mtl(x, W, b, U, cores, V, torch.arange(48))
        for t in (0, 17, 47):
            same = mtl(x, W, b, U, cores, V, torch.full((48,), t))
            torch.testing.assert_close(same[t], spread[t], rtol=1e-6, atol=1e-6)


# --- CUDA -----------------------------------------------------------------------------------------

CUDA_CASES = CASES + [((2, 300, 4096), 4096, 32, 1024, True, False), ((16, 4096), 4096, 64, 16, True, False)]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["auto", "gather", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,k,T,bias,noncontig", CUDA_CASES)
def test_cuda_values(dtype, strategy, shape, d_out, k, T, bias, noncontig):
    inputs = make(shape, d_out, k, T, dtype, device="cuda", bias=bias, noncontig=noncontig)
    for per_sequence in (False, True):
        ids = make_ids(inputs[0], T, per_sequence, device="cuda")
        check(inputs, ids, dtype != torch.float32, strategy=strategy)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    """No host sync on the ids: the op is captured once and replays with new ids in place."""
    x, W, b, U, cores, V = make((64, 256), 192, 16, 8, torch.bfloat16, device="cuda")
    static_ids = make_ids(x, 8, False, device="cuda")
    with torch.no_grad():
        for strategy in ("gather", "grouped"):
            mtl(x, W, b, U, cores, V, static_ids, strategy=strategy)  # warm-up: autotune outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = mtl(x, W, b, U, cores, V, static_ids, strategy=strategy)
            for _ in range(3):
                new = make_ids(x, 8, False, device="cuda")
                static_ids.copy_(new)
                graph.replay()
                torch.cuda.synchronize()
                torch.testing.assert_close(out, mtl(x, W, b, U, cores, V, new, strategy=strategy), rtol=0, atol=0)
                base = new < 0
                assert torch.equal(out[base], F.linear(x, W, b)[base])


@requires_cuda
@pytest.mark.cuda
def test_cuda_opcheck_compile_and_context_manager():
    x, W, b, U, cores, V = make((3, 5, 64), 48, 8, 4, torch.bfloat16, device="cuda")
    ids = make_ids(x, 4, False, device="cuda")
    torch.library.opcheck(torch.ops.share_kernels.multi_task_linear.default, (x, W, b, U, cores, V, ids))
    with torch.no_grad():
        f = torch.compile(mtl, fullgraph=True)
        torch.testing.assert_close(f(x, W, b, U, cores, V, ids), mtl(x, W, b, U, cores, V, ids))
        model = wrapped_model(torch.float32).cuda()
        xm = torch.randn(6, 12, device="cuda")
        outs = per_task_outputs(model, xm)
        with share_kernels.task_ids(model, ["c", "__base__", "a", "b", "__base__", "a"]):
            mixed = model(xm)
        for i, n in enumerate(["c", None, "a", "b", None, "a"]):
            assert rel_err(mixed[i], outs[n][i]) < 1e-5


# --- the benchmark suite's baselines ---------------------------------------------------------------


def test_bench_baselines_compute_the_same_layer(monkeypatch):
    """The BGMV gather and peft's mixed batch compute per-row LoRA; the suite's rows carry the
    ratios and bytes per tenant (tiny shapes, CPU)."""
    from share_kernels.bench import multi_task_linear as bench

    w = bench.make_weights(5, 24, 4, torch.float64, torch.device("cpu"))
    x = torch.randn(9, 24, dtype=torch.float64)
    ids = bench.make_ids("uniform", 9, 5, "cpu", seed=1)
    want = torch.stack([F.linear(x[i], w["W"], w["b"]) + w["B"][t] @ (w["A"][t] @ x[i]) for i, t in enumerate(ids.tolist())])
    torch.testing.assert_close(bench.bgmv_lora(x, w["W"], w["b"], w["A"], w["B"], ids), want)
    peft = bench.peft_model(w, 5)
    with torch.no_grad():
        torch.testing.assert_close(peft(x, adapter_names=[f"t{t}" for t in ids.tolist()]), want)
    assert bench.make_ids("distinct", 6, 4, "cpu").tolist() == [0, 1, 2, 3, 0, 1]
    assert set(bench.make_ids("identical", 6, 4, "cpu").tolist()) == {0}
    z = bench.make_ids("zipf1.5", 4000, 16, "cpu")
    counts = torch.bincount(z, minlength=16)
    assert z.min() >= 0 and z.max() < 16 and counts[0] > counts[1] > counts[3] > counts[15]

    monkeypatch.setattr(bench, "shapes", lambda device, preset: ((1, 3), (16,), ("distinct",), 32, 4, torch.float32, "test"))
    real_time_ms = bench.time_ms
    monkeypatch.setattr(bench, "time_ms", lambda fn, device, **kw: real_time_ms(fn, device, min_reps=2, budget_s=0.0))
    rows = bench.run(torch.device("cpu"), "quick", echo=lambda *a: None)
    assert [r["case"] for r in rows] == ["T=1 rows=16 distinct", "T=3 rows=16 distinct"]
    for r in rows:
        assert r["share/single"] == r["share ms"] / r["single-task ms"] > 0
        assert r["peft/share"] == r["peft ms"] / r["share ms"]
        assert r["share B/tenant"] == 2 * 4 * bench.P * 4 and r["lora B/tenant"] == bench.LORA_R * 64 * 4


@requires_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_core_split_over_d_in(triton_cpu, monkeypatch, dtype):
    """d_in = 600 in two K splits (512 + 88 columns): each split multiplies its partial t by the
    cores and the expand kernel sums the partial s; values against float64, base rows exact."""
    import share_kernels.kernels.multi_task_linear as mk

    seen = []
    real = mk.core_kernel_args
    monkeypatch.setattr(mk, "core_kernel_args", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    inputs = make((3, 4, 600), 24, 8, 6, dtype)
    check(inputs, make_ids(inputs[0], 6, per_sequence=False), dtype != torch.float32)
    (args, _), = seen
    t_buf, k_per_split = args[5], args[13]
    assert t_buf.shape[0] == 2 and k_per_split == 512
