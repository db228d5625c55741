"""project_complement(_grouped): values against float64 on the compiled CPU kernel (and CUDA
when there is one), the projection identities, strides, the grouped op, opcheck, compile, bad
inputs, where the dispatcher's kernels come from, and the fallback without an extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from share_kernels import _ext
from share_kernels.ops.project_complement import (
    CUBLAS_MIN_K,
    project_complement,
    project_complement_cublas,
    project_complement_grouped,
    project_complement_reference,
    uses_cublas,
)
from tests.conftest import requires_cuda

OP = "share_kernels::project_complement"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
# (d, n, k): odd sizes, d = 4097, n = 1, k = 1 and k = d
SHAPES = [(59, 101, 7), (4097, 33, 5), (59, 101, 1), (64, 130, 64), (17, 1, 3)]


def orthonormal(d, k, dtype=torch.float64, device="cpu"):
    """(d, k) row-major with orthonormal columns (QR in float64, then cast)."""
    return torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))[0].to(device=device, dtype=dtype).contiguous()


def reference64(X, M, mode):
    return project_complement_reference(X.double(), M.double(), mode)


def rel_err(out, ref, X):
    """‖out − ref‖ / ‖ref‖, or / ‖X‖ where ref vanishes (remove with k = d)."""
    denom = ref.norm() if ref.norm() > 1e-3 * X.double().norm() else X.double().norm()
    return ((out.double() - ref).norm() / denom).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["remove", "retain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,n,k", SHAPES)
def test_matches_float64_reference(d, n, k, dtype, mode, device):
    X = torch.randn(d, n, dtype=dtype, device=device)
    M = orthonormal(d, k, dtype, device)
    out = project_complement(X, M, mode)
    assert out.shape == (d, n) and out.dtype == dtype and out.device == X.device and out.is_contiguous()
    assert rel_err(out, reference64(X, M, mode), X) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["remove", "retain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,n,k", [(59, 101, 7), (64, 130, 64), (33, 300, 1)])
def test_low_precision_within_2x_of_pytorch(d, n, k, dtype, mode, device):
    """fp16 / bf16 (fp32 accumulation) err at most 2x plain PyTorch in the same dtype, both vs float64."""
    X = torch.randn(d, n, device=device).to(dtype)
    M = orthonormal(d, k, dtype, device)
    ref = reference64(X, M, mode)
    out = project_complement(X, M, mode)
    assert out.dtype == dtype
    assert rel_err(out, ref, X) <= 2 * rel_err(project_complement_reference(X, M, mode), ref, X)


def test_cublas_switch_points():
    """CUDA routes to cuBLAS exactly where k makes the fused pass compute bound (module docstring):
    bf16 from k = 32, fp32 / fp64 from k = 64, fp16 never; independent of d and n."""
    assert CUBLAS_MIN_K == {torch.bfloat16: 32, torch.float32: 64, torch.float64: 64}
    for d, n in [(768, 4096), (4096, 65536), (33, 1)]:
        assert not uses_cublas(d, n, 31, torch.bfloat16) and uses_cublas(d, n, 32, torch.bfloat16)
        for dt in (torch.float32, torch.float64):
            assert not uses_cublas(d, n, 63, dt) and uses_cublas(d, n, 64, dt)
        assert not any(uses_cublas(d, n, k, torch.float16) for k in (1, 64, 2048))
    assert not uses_cublas(0, 5, 64, torch.bfloat16) and not uses_cublas(5, 0, 64, torch.bfloat16)


@pytest.mark.parametrize("mode", ["remove", "retain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,n,k", [(97, 130, 64), (64, 33, 40)])
def test_cublas_form_matches_float64_reference(d, n, k, dtype, mode):
    """The compute-bound form (two GEMMs, subtraction in addmm's epilogue), here on CPU tensors:
    fp32 / fp64 to the op's tolerance, fp16 / bf16 within 2x of plain PyTorch; strided X too."""
    X = torch.randn(d, 2 * n).to(dtype)[:, ::2]
    M = orthonormal(d, k, dtype)
    out = project_complement_cublas(X, M, mode)
    ref = reference64(X, M, mode)
    assert out.shape == (d, n) and out.dtype == dtype and out.is_contiguous()
    if dtype in TOL:
        assert rel_err(out, ref, X) < TOL[dtype]
    else:
        assert rel_err(out, ref, X) <= 2 * rel_err(project_complement_reference(X, M, mode), ref, X)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_identities(dtype, device):
    """remove + retain = X, Mᵀ remove = 0, and remove is idempotent."""
    d, n, k = 97, 211, 13
    tol = TOL[dtype] * 10
    X = torch.randn(d, n, dtype=dtype, device=device)
    M = orthonormal(d, k, dtype, device)
    removed, retained = project_complement(X, M, "remove"), project_complement(X, M, "retain")
    scale = X.norm()
    assert (removed + retained - X).norm() / scale < tol
    assert (M.T @ removed).norm() / scale < tol
    assert (project_complement(removed, M) - removed).norm() / scale < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layout", ["X column-strided", "X transposed", "X row-sliced", "M column-major", "M column-strided"]
)
def test_noncontiguous_inputs(layout, device):
    d, n, k = 59, 77, 6
    M = orthonormal(d, k, torch.float32, device)
    X = torch.randn(d, n, device=device)
    if layout == "X column-strided":
        X = torch.randn(d, 2 * n, device=device)[:, ::2]
    elif layout == "X transposed":
        X = torch.randn(n, d, device=device).t()
    elif layout == "X row-sliced":
        X = torch.randn(2 * d, n + 5, device=device)[::2, 3 : 3 + n]
    elif layout == "M column-major":  # as torch.linalg.qr returns it
        M = M.t().contiguous().t()
    else:
        wide = torch.zeros(d, 2 * k, device=device)
        wide[:, ::2] = M
        M = wide[:, ::2]
    assert not (X.is_contiguous() and M.is_contiguous())
    for mode in ("remove", "retain"):
        out = project_complement(X, M, mode)
        assert out.is_contiguous()
        assert rel_err(out, reference64(X, M, mode), X) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_sizes(device):
    """k = 0 leaves X whole (remove) or nothing (retain); empty X gives empty outputs."""
    X = torch.randn(9, 5, device=device)
    M = torch.zeros(9, 0, device=device)
    torch.testing.assert_close(project_complement(X, M, "remove"), X)
    torch.testing.assert_close(project_complement(X, M, "retain"), torch.zeros_like(X))
    empty = project_complement(torch.randn(9, 0, device=device), orthonormal(9, 3, torch.float32, device))
    assert empty.shape == (9, 0)
    assert project_complement_grouped([], []) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_equals_one_by_one(dtype, device):
    """Mixed shapes, more layers than one CUDA launch takes (40), a strided X, an empty X."""
    shapes = [(59, 101, 7), (33, 1, 33), (128, 300, 16), (17, 0, 2), (40, 64, 1)] * 10
    shapes.append((768, 257, 24))
    Xs = [torch.randn(d, n, device=device).to(dtype) for d, n, _ in shapes]
    Xs[2] = torch.randn(128, 600, device=device).to(dtype)[:, ::2]
    Ms = [orthonormal(d, k, dtype, device) for d, _, k in shapes]
    for mode in ("remove", "retain"):
        grouped = project_complement_grouped(Xs, Ms, mode)
        assert len(grouped) == len(Xs)
        for X, M, out in zip(Xs, Ms, grouped):
            torch.testing.assert_close(out, project_complement(X, M, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    X = torch.randn(23, 31, device=device)
    M = orthonormal(23, 5, torch.float32, device)
    project_complement(X, M)  # loads the extension and registers the fake kernels
    for mode in ("remove", "retain"):
        torch.library.opcheck(torch.ops.share_kernels.project_complement.default, (X, M, mode))
        torch.library.opcheck(
            torch.ops.share_kernels.project_complement_grouped.default, ([X, X[:7, ::2]], [M, M[:7, :3]], mode)
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    X = torch.randn(40, 50)
    M = orthonormal(40, 6, torch.float32)

    def f(X, M):
        outs = project_complement_grouped([X, X[:20]], [M, M[:20, :3]], "retain")
        return project_complement(X, M) * 2 + outs[0], outs[1]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=backend)(X, M)
    want = f(X, M)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_inputs():
    X, M = torch.randn(59, 10), orthonormal(59, 3, torch.float32)
    with pytest.raises(ValueError, match=r'mode must be "remove" or "retain"; got \'keep\''):
        project_complement(X, M, "keep")
    with pytest.raises(ValueError, match=r"M must have as many rows as X; got X \(59, 10\) and M \(58, 3\)"):
        project_complement(X, M[:58])
    with pytest.raises(ValueError, match=r"X must be 2-D \(d, n\); got X of shape \(59\)"):
        project_complement(X[:, 0], M)
    with pytest.raises(ValueError, match=r"M must be 2-D \(d, k\); got M of shape \(1, 59, 3\)"):
        project_complement(X, M[None])
    with pytest.raises(TypeError, match=r"same dtype; got X=float32, M=float64"):
        project_complement(X, M.double())
    with pytest.raises(TypeError, match=r"dtype int64 is not supported"):
        project_complement(X.long(), M.long())
    with pytest.raises(TypeError, match=r"M must be a torch.Tensor; got ndarray"):
        project_complement(X, M.numpy())
    with pytest.raises(ValueError, match=r"Xs and Ms must have the same length; got 2 and 1"):
        project_complement_grouped([X, X], [M])
    with pytest.raises(ValueError, match=r"Ms\[1\] must have as many rows as Xs\[1\]; got Xs\[1\] \(59, 10\)"):
        project_complement_grouped([X, X], [M, M[:58]])
    with pytest.raises(TypeError, match=r"Xs\[1\]=float64"):
        project_complement_grouped([X, X.double()], [M, M.double()])
    with pytest.raises(TypeError, match=r"Xs must be a list or tuple"):
        project_complement_grouped(X, [M])


def test_compiled_kernels_check_their_inputs():
    """Called past the Python checks, the C++ kernels raise ValueError / TypeError as well."""
    project_complement(torch.randn(3, 2), orthonormal(3, 1, torch.float32))
    op = torch.ops.share_kernels.project_complement
    X, M = torch.randn(59, 10), orthonormal(59, 3, torch.float32)
    with pytest.raises(ValueError, match=r"mode must be"):
        op(X, M, "keep")
    with pytest.raises(ValueError, match=r"M must have as many rows as X"):
        op(X, M[:58], "remove")
    with pytest.raises(TypeError, match=r"same dtype"):
        op(X, M.double(), "remove")
    with pytest.raises(ValueError, match=r"Ms\[1\] must be 2-D"):
        torch.ops.share_kernels.project_complement_grouped([X, X], [M, M[0]], "remove")


def _kernel_line(op: str, key: str) -> str:
    dump = torch._C._dispatch_dump(op)
    return next((line for line in dump.splitlines() if line.startswith(f"{key}:")), "")


def test_cpu_kernel_comes_from_the_extension():
    """The dispatcher's CPU kernels were registered from csrc/projection.cpp, not from Python."""
    assert _ext.load(), "the compiled extension did not load (see the warning)"
    assert _ext.state in ("aot", "jit")
    for op in (OP, OP + "_grouped"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert "projection.cpp" in _kernel_line(op, "CPU"), torch._C._dispatch_dump(op)
        assert "ops.cpp" in torch._C._dispatch_dump(op).splitlines()[2]  # "debug: registered at ...": the schema


@requires_cuda
@pytest.mark.cuda
def test_cuda_kernel_comes_from_the_extension():
    assert _ext.load()
    for op in (OP, OP + "_grouped"):
        assert "projection.cu" in _kernel_line(op, "CUDA"), torch._C._dispatch_dump(op)


def _run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_fallback_without_extension_warns_once_and_uses_the_reference():
    """No prebuilt module and no compiler: one RuntimeWarning, the reference as the ops' kernel."""
    code = """
        import importlib, warnings
        import torch
        import share_kernels._ext as ext

        real_import = importlib.import_module
        def no_prebuilt(name, *a, **k):
            if name == "share_kernels._C":
                raise ImportError("pretend there is no prebuilt extension")
            return real_import(name, *a, **k)
        def no_compiler(src):
            raise RuntimeError("pretend there is no C++ compiler")
        ext.importlib.import_module = no_prebuilt
        ext._jit_build = no_compiler

        from share_kernels.ops.project_complement import (
            project_complement, project_complement_grouped, project_complement_reference)
        X = torch.randn(31, 40)
        M = torch.linalg.qr(torch.randn(31, 4))[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [project_complement(X, M, mode) for mode in ("remove", "retain", "remove")]
            grouped = project_complement_grouped([X, X[:9]], [M, M[:9]], "retain")
        mine = [w for w in caught if "share_kernels" in str(w.message)]
        assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning), [str(w.message) for w in caught]
        assert "pretend there is no C++ compiler" in str(mine[0].message)
        assert ext.state == "missing"
        torch.testing.assert_close(outs[0], project_complement_reference(X, M, "remove"), rtol=0, atol=0)
        torch.testing.assert_close(outs[1], project_complement_reference(X, M, "retain"), rtol=0, atol=0)
        torch.testing.assert_close(grouped[1], project_complement_reference(X[:9], M[:9], "retain"), rtol=0, atol=0)
        dump = torch._C._dispatch_dump("share_kernels::project_complement")
        assert ".cpp" not in dump, dump
        torch.library.opcheck(torch.ops.share_kernels.project_complement.default, (X, M, "remove"))
        print("fallback ok")
    """
    res = _run_python(code)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


def test_jit_build_from_clean_cache(tmp_path):
    """Without the prebuilt module, the first call compiles csrc/ into an empty cache and uses it
    (about 15 s for the CPU kernels on 2 cores). That first call is a torch.compile'd one: the
    loading happens at trace time, without a graph break."""
    code = """
        import importlib, warnings
        import torch
        import share_kernels._ext as ext

        real_import = importlib.import_module
        def no_prebuilt(name, *a, **k):
            if name == "share_kernels._C":
                raise ImportError("pretend there is no prebuilt extension")
            return real_import(name, *a, **k)
        ext.importlib.import_module = no_prebuilt

        from share_kernels.ops.project_complement import project_complement, project_complement_reference
        warnings.simplefilter("error", RuntimeWarning)
        X = torch.randn(31, 40)
        M = torch.linalg.qr(torch.randn(31, 4))[0]
        compiled = torch.compile(project_complement, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(X, M), project_complement_reference(X, M))
        assert ext.state == "jit", ext.state
        dump = torch._C._dispatch_dump("share_kernels::project_complement")
        assert "projection.cpp" in dump, dump
        print("jit ok")
    """
    res = _run_python(code, env={"SHARE_KERNELS_CACHE": str(tmp_path)})
    assert res.returncode == 0 and "jit ok" in res.stdout, res.stdout + res.stderr
    assert any(p.suffix == ".so" for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))
