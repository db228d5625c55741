"""``share-kernels gpu-check``: the first thing to run on a GPU, inside an 8-minute budget.

Phases, each timed:

1. **build**: load (or build) the C++/CUDA extension.
2. **compile**: every Triton kernel specialisation and autotune configuration the later phases
   will ask for, compiled in parallel worker processes (:mod:`share_kernels.kernels.aot`): on
   CUDA into the Triton cache, so the autotuner finds them compiled; with ``--device cpu`` for
   sm_90 ahead of time, which gives the count and the compile time of that set on this CPU and
   checks that none spills.
3. **tests**: correctness of every kernel against a float64 reference: lowrank_linear forward
   and backward, multi_task_linear (gather, grouped, id -1 rows bit-identical to ``F.linear``),
   stability_loss and its gradients, project_complement, in bf16 and fp16 (low-precision rule:
   error within 2x of plain PyTorch in the same dtype) and fp32 (routed to cuBLAS on CUDA:
   checked that no Triton kernel ran), fp16 with ``|x @ U| > 65504``, and CUDA-graph capture.
4. **bench**: the goal shapes of the lowrank_linear and multi_task_linear suites with their
   goals (ratios against baselines timed in the same run; decode also timed as CUDA-graph
   replays), then the other suites (``share-kernels bench``) in subprocesses, each given what is
   left of the budget.
5. **report**: ``DIR/gpu_check.md`` and ``DIR/gpu_check.json``: device, versions, date, each
   ratio beside its goal with met / missed, every failure, the elapsed time per phase.

``--device cpu`` runs the same phases end to end on tiny shapes (the kernels through Triton's
interpreter, bf16 fixed by :mod:`share_kernels.kernels.interpreter`); CI runs it that way.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
import traceback

BUDGET_S = 480.0
SUITES_AFTER = ("pslora", "inflora", "project_complement", "share")


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (tiny shapes, interpreter)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (default 480)")
    p.add_argument("--jobs", type=int, default=None, help="compile worker processes (default: CPU count, at most 16)")
    p.add_argument("--no-suites", action="store_true", help="skip the other benchmark suites (the last phase)")
    p.add_argument("--max-compiles", type=int, default=None,
                   help="compile only the first N tasks of the plan (CI smoke runs; default: all)")


# --- helpers ------------------------------------------------------------------------------------


def _rel(out, ref) -> float:
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30))


class _Counter:
    """Counts launches of a kernel launcher (to prove a path ran, or did not)."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0
        self.real = getattr(module, name)

    def __enter__(self):
        def wrapped(*a, **kw):
            self.calls += 1
            return self.real(*a, **kw)

        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)


def _low_precision_ok(outs, plains, refs) -> tuple[bool, str]:
    """Each output's error against float64 within 2x of plain PyTorch's (plus 1e-6)."""
    errs = [(_rel(o, r), _rel(p, r)) for o, p, r in zip(outs, plains, refs)]
    ok = all(e <= 2 * p + 1e-6 for e, p in errs)
    return ok, "; ".join(f"{e:.2e} vs plain {p:.2e}" for e, p in errs)


# --- shapes -------------------------------------------------------------------------------------


def _test_shapes(cuda: bool):
    """(lowrank cases, multi_task cases, stability cases): small, odd, one goal-sized each on CUDA."""
    # d_in, d_out multiples of 16 (what the kernels take on CUDA), odd batch sizes and ranks.
    # The last lowrank case is unaligned: on CUDA it must take cuBLAS (no Triton launch).
    lowrank = [((3, 19, 64), 48, 5, True), ((2, 7, 32), 80, 16, False), ((3, 5, 59), 37, 5, True)]
    multi = [((4, 9, 48), 32, 6, 5), ((70, 64), 48, 16, 7)]
    stab = [(5, 64, 48), (16, 128, 80)]
    if cuda:
        lowrank += [((2, 150, 4096), 4096, 64, True)]
        multi += [((300, 4096), 4096, 32, 64)]
        stab += [(16, 4096, 4097)]
    return lowrank, multi, stab


def _bench_shapes(cuda: bool):
    if cuda:
        return dict(d=4096, lowrank_M=(1, 16, 8192), train_M=(2048,), k=(16, 64), mt_rows=(16, 4096), mt_T=(16, 1024), mt_k=32)
    return dict(d=128, lowrank_M=(1, 16, 256), train_M=(64,), k=(16,), mt_rows=(16, 128), mt_T=(4, 16), mt_k=16)


# --- phases -------------------------------------------------------------------------------------


def _environment(device) -> dict:
    import torch

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = "absent"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm_{cap[0]}{cap[1]}"
        env["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        env["commit"] = "unknown"
    return env


def _build() -> dict:
    from . import _ext

    ok = _ext.load()
    return {"extension": "loaded" if ok else "missing (project_complement runs its PyTorch reference)", "ok": True}


def compile_plan(cuda: bool) -> list:
    """The Triton compile tasks the tests and benchmarks below trigger (deduplicated)."""
    import torch

    from .kernels import aot

    tasks = []
    lowrank, multi, stab = _test_shapes(cuda)
    bs = _bench_shapes(cuda)
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).replace("torch.", "")
        for shape, d_out, k, bias in lowrank:
            if cuda and (shape[-1] % 16 or d_out % 16):
                continue  # routed to cuBLAS on CUDA
            M = 1
            for s in shape[:-1]:
                M *= s
            for direction in ("fwd", "dx_t"):
                tasks += aot.plan_launches(aot.lowrank_launches(dt, M, shape[-1], d_out, k, direction, bias), f"{name} test {direction}")
        for shape, d_out, k, T in multi:
            M = 1
            for s in shape[:-1]:
                M *= s
            for grouped in (False, True):
                tasks += aot.plan_multi_task(aot.multi_task_launch(dt, M, shape[-1], d_out, k, T, grouped), f"{name} test")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for r, d_in, d_out in stab:
            for g in (False, True):
                args, meta = aot.stability_launch(dt, r, d_in, d_out, g)
                tasks += aot.plan("stability_loss", args, meta, "test")
    # fp16 overflow check and the graph captures
    for direction in ("fwd", "dx_t"):
        tasks += aot.plan_launches(aot.lowrank_launches(torch.float16, 6, 64, 24, 4, direction), "overflow")
    tasks += aot.plan_multi_task(aot.multi_task_launch(torch.float16, 6, 64, 24, 4, 3), "overflow")
    tasks += aot.plan_multi_task(aot.multi_task_launch(torch.bfloat16, 16, 256, 192, 16, 8), "graph")
    # benchmarks: bf16 goal shapes
    d = bs["d"]
    for k in bs["k"]:
        for M in bs["lowrank_M"]:
            tasks += aot.plan_launches(aot.lowrank_launches(torch.bfloat16, M, d, d, k, "fwd"), "bench")
        for M in bs["train_M"]:
            for direction in ("fwd", "dx_t"):
                tasks += aot.plan_launches(aot.lowrank_launches(torch.bfloat16, M, d, d, k, direction), "bench")
    for rows in bs["mt_rows"]:
        for T in bs["mt_T"]:
            # "auto" always gathers (ops.multi_task_linear.choose_strategy): rows in order only
            tasks += aot.plan_multi_task(aot.multi_task_launch(torch.bfloat16, rows, d, d, bs["mt_k"], T), "bench")
        tasks += aot.plan_launches(aot.lowrank_launches(torch.bfloat16, rows, d, d, bs["mt_k"], "fwd"), "bench")
    return aot.unique(tasks)


def _compile(device, jobs, max_compiles=None) -> dict:
    from .kernels import aot

    cuda = device.type == "cuda"
    planned = compile_plan(cuda)
    tasks = planned[:max_compiles] if max_compiles is not None else planned
    jobs = jobs or min(16, os.cpu_count() or 1)
    if cuda:
        import torch

        cap = torch.cuda.get_device_capability(device)
        arch = cap[0] * 10 + cap[1]
        cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
        t0 = time.perf_counter()
        results = aot.compile_tasks(tasks, arch=arch, jobs=jobs, cache_dir=cache)
    else:
        import tempfile

        arch = 90
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:  # cold: nothing from an earlier run
            results = aot.compile_tasks(tasks, arch=arch, jobs=jobs, cache_dir=cache)
    wall = time.perf_counter() - t0
    errors = [r for r in results if "error" in r]
    bad = [r for r in results if "error" not in r and not aot.fits(r)]
    if not cuda:
        bad = errors + bad
    return {
        # On CUDA the workers only warm the cache: a worker error costs time at first use, not
        # correctness, so it is reported without failing the check.
        "cache_fill_errors": [f"{r['name']}: {r['error']}" for r in errors] if cuda else [],
        "target": f"sm_{arch}",
        "planned": len(planned),
        "compiles": len(tasks),
        "jobs": jobs,
        "wall_s": round(wall, 1),
        "summed_s": round(sum(r["seconds"] for r in results), 1),
        "not_fitting": [r["name"] + (f": {r['error']}" if "error" in r else f": spill {r.get('stack')} B, smem {r['smem']} B")
                        for r in bad],
        "ok": not bad,
    }


def _checks(device) -> list[dict]:
    """(name, ok, detail) per correctness check."""
    import torch
    import torch.nn.functional as F

    from . import lowrank_linear, multi_task_linear, project_complement, stability_loss
    from .kernels import lowrank_linear as lk
    from .kernels import multi_task_linear as mk
    from .ops.lowrank_linear import lowrank_linear_reference
    from .ops.multi_task_linear import multi_task_linear_reference
    from .ops.project_complement import project_complement_reference
    from .ops.stability_loss import stability_loss_reference

    cuda = device.type == "cuda"
    out = []
    lowrank, multi, stab = _test_shapes(cuda)

    def run(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # every failure is reported, the check goes on
            ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0][:300] + " | " + traceback.format_exc(limit=-2).replace("\n", " ")[-400:]
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    def g(*s, dtype, scale=1.0):
        return (torch.randn(*s, device=device) * scale).to(dtype)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dn = str(dtype).replace("torch.", "")
        kernel_expected = dtype != torch.float32 or not cuda  # fp32 on CUDA: cuBLAS

        for shape, d_out, k, bias in lowrank:
            def lr(shape=shape, d_out=d_out, k=k, bias=bias, dtype=dtype):
                d_in = shape[-1]
                x = g(*shape, dtype=dtype)
                W, U, C = g(d_out, d_in, dtype=dtype, scale=d_in**-0.5), g(d_in, k, dtype=dtype, scale=d_in**-0.5), g(k, d_out, dtype=dtype, scale=k**-0.5)
                b = g(d_out, dtype=dtype) if bias else None
                leaves = [t.requires_grad_() for t in (x, U, C)]
                gy = g(*shape[:-1], d_out, dtype=dtype)
                with _Counter(lk, "lowrank_linear_forward") as c:
                    y = lowrank_linear(x, W, b, U, C)
                    grads = torch.autograd.grad(y, leaves, gy)
                ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, W, b, U, C)]
                y_ref = lowrank_linear_reference(*ref_in)
                refs = [y_ref.detach(), *torch.autograd.grad(y_ref, [ref_in[0], ref_in[3], ref_in[4]], gy.double())]
                expected = kernel_expected and (not cuda or (d_in % 16 == 0 and d_out % 16 == 0))
                if (c.calls == 2) != expected:
                    return False, f"Triton launches {c.calls}, expected {'2' if expected else '0 (cuBLAS)'}"
                if dtype == torch.float32:
                    errs = [_rel(o, r) for o, r in zip([y, *grads], refs)]
                    return max(errs) < 1e-5, "rel. errors " + ", ".join(f"{e:.1e}" for e in errs)
                plain_in = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, W, b, U, C)]
                y_p = lowrank_linear_reference(*plain_in)
                plains = [y_p, *torch.autograd.grad(y_p, [plain_in[0], plain_in[3], plain_in[4]], gy)]
                return _low_precision_ok([y, *grads], plains, refs)

            run(f"lowrank_linear {dn} x{tuple(shape)} d_out={d_out} k={k} fwd+bwd", lr)

        for shape, d_out, k, T in multi:
            for strategy in ("gather", "grouped"):
                def mt(shape=shape, d_out=d_out, k=k, T=T, dtype=dtype, strategy=strategy):
                    d_in = shape[-1]
                    x, W, b = g(*shape, dtype=dtype), g(d_out, d_in, dtype=dtype, scale=d_in**-0.5), g(d_out, dtype=dtype)
                    U, V = g(d_in, k, dtype=dtype, scale=d_in**-0.5), g(d_out, k, dtype=dtype, scale=k**-0.5)
                    cores = g(T, k, k, dtype=dtype, scale=k**-0.5)
                    ids = torch.randint(-1, T, shape[:-1], device=device)
                    with torch.no_grad(), _Counter(mk, "multi_task_delta_") as c:
                        y = multi_task_linear(x, W, b, U, cores, V, ids, strategy=strategy)
                    ref = multi_task_linear_reference(*(t.double() for t in (x, W, b, U, cores, V)), ids)
                    base = ids.reshape(-1) < 0
                    exact = torch.equal(y.reshape(-1, d_out)[base], F.linear(x, W, b).reshape(-1, d_out)[base])
                    if (c.calls == 1) != kernel_expected:
                        return False, f"Triton launches {c.calls}, expected {'1' if kernel_expected else '0 (cuBLAS)'}"
                    if not exact:
                        return False, "id -1 rows differ from F.linear"
                    if dtype == torch.float32:
                        return _rel(y, ref) < 1e-5, f"rel. error {_rel(y, ref):.1e}"
                    plain = multi_task_linear_reference(x, W, b, U, cores, V, ids)
                    return _low_precision_ok([y], [plain], [ref])

                run(f"multi_task_linear {dn} {strategy} x{tuple(shape)} k={k} T={T}", mt)

        for r, d_in, d_out in stab:
            def st(r=r, d_in=d_in, d_out=d_out, dtype=dtype):
                A, B, P = g(r, d_in, dtype=dtype), g(d_out, r, dtype=dtype, scale=0.3), g(d_out, d_in, dtype=dtype, scale=0.5)
                a, bb = A.clone().requires_grad_(), B.clone().requires_grad_()
                loss = stability_loss(a, bb, P, 3.0)
                da, db = torch.autograd.grad(loss, [a, bb])
                ref = stability_loss_reference(A.double(), B.double(), P.double(), 3.0, torch.ones((), dtype=torch.float64, device=device))
                outs, refs = [loss, da, db], list(ref)
                if dtype == torch.float32:
                    errs = [_rel(o, r) for o, r in zip(outs, refs)]
                    return max(errs) < 1e-4, "rel. errors " + ", ".join(f"{e:.1e}" for e in errs)
                # the gradients come back in the inputs' dtype: judged by the low-precision rule
                plain = stability_loss_reference(A, B, P, 3.0, torch.ones((), dtype=torch.float32, device=device))
                return _low_precision_ok(outs, list(plain), refs)

            run(f"stability_loss {dn} r={r} {d_in}x{d_out} loss+grads", st)

        def pc(dtype=dtype, k=9):
            d, n = 130, 77
            M = torch.linalg.qr(torch.randn(d, k, device=device, dtype=torch.float64))[0].to(dtype)
            X = g(d, n, dtype=dtype)
            y = project_complement(X, M)
            ref = project_complement_reference(X.double(), M.double())
            if dtype == torch.float32:
                return _rel(y, ref) < 1e-5, f"rel. error {_rel(y, ref):.1e}"
            return _low_precision_ok([y], [project_complement_reference(X, M)], [ref])

        run(f"project_complement {dn} d=130 n=77 k=9", pc)
        # k = 72: the cuBLAS route on CUDA for bf16 / fp32 (ops.project_complement.uses_cublas)
        run(f"project_complement {dn} d=130 n=77 k=72", functools.partial(pc, k=72))

    def overflow():
        x = g(6, 64, dtype=torch.float16, scale=40)
        W, U = g(24, 64, dtype=torch.float16, scale=1 / 8), g(64, 4, dtype=torch.float16, scale=200)
        C, b = g(4, 24, dtype=torch.float16, scale=1 / 600), g(24, dtype=torch.float16)
        y = lowrank_linear(x, W, b, U, C)
        ref = lowrank_linear_reference(*(t.double() for t in (x, W, b, U, C)))
        big = float((x.double() @ U.double()).abs().max())
        ok = big > 65504 and bool(torch.isfinite(y).all()) and _rel(y, ref) < 2e-3
        return ok, f"max |x U| = {big:.3g}, rel. error {_rel(y, ref):.1e}, finite {bool(torch.isfinite(y).all())}"

    run("lowrank_linear fp16 |x U| > 65504 stays finite", overflow)

    if cuda:
        def graph():
            x, W, b = g(16, 256, dtype=torch.bfloat16), g(192, 256, dtype=torch.bfloat16, scale=1 / 16), g(192, dtype=torch.bfloat16)
            U, V, cores = g(256, 16, dtype=torch.bfloat16, scale=1 / 16), g(192, 16, dtype=torch.bfloat16), g(8, 16, 16, dtype=torch.bfloat16)
            ids = torch.randint(-1, 8, (16,), device=device)
            with torch.no_grad():
                eager = multi_task_linear(x, W, b, U, cores, V, ids, check_ids=False)  # warm-up (autotune) outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = multi_task_linear(x, W, b, U, cores, V, ids, check_ids=False)
                ids.copy_(torch.randint(-1, 8, (16,), device=device))
                graph.replay()
                torch.cuda.synchronize()
                want = multi_task_linear(x, W, b, U, cores, V, ids, check_ids=False)
            return torch.equal(out, want) and eager.shape == out.shape, "replay with new ids equals eager"

        run("multi_task_linear bf16 CUDA-graph capture and replay", graph)
    return out


# --- benchmarks ---------------------------------------------------------------------------------


def _time(fn, device) -> float:
    from .bench.common import time_ms

    # CPU runs are a smoke test of the phase (tiny shapes), not measurements worth a budget.
    return time_ms(fn, device, budget_s=0.5) if device.type == "cuda" else time_ms(fn, device, min_reps=3, budget_s=0.01)


def _graph_ms(fn, device) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (after a warm-up call)."""
    import torch
    import triton.testing

    fn()
    torch.cuda.synchronize(device)
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median"))


def _goal(value, op, target) -> dict:
    met = value <= target if op == "<=" else value >= target
    return {"value": round(value, 4), "goal": f"{op} {target}", "met": bool(met)}


def _bench(device) -> list[dict]:
    """Goal rows: dicts with suite, case, ratio, value, goal, met."""
    import torch
    import torch.nn.functional as F

    from . import lowrank_linear, multi_task_linear
    from .bench import lowrank_linear as lb
    from .bench import multi_task_linear as mb

    cuda = device.type == "cuda"
    bs = _bench_shapes(cuda)
    d, rows = bs["d"], []
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.no_grad():
        for k in bs["k"]:
            for M in bs["lowrank_M"]:
                sets, peft = lb.make_case(M, d, k, dtype, device)
                t = {impl: _time(lb.case_fn(impl, "fwd", sets, peft), device) for impl in ("fused", "F.linear", "reference")}
                case = f"fwd M={M} k={k} d={d}"
                if M <= 16:
                    rows.append({"suite": "lowrank_linear", "case": case, "ratio": "fused/F.linear", **_goal(t["fused"] / t["F.linear"], "<=", 1.05)})
                    rows.append({"suite": "lowrank_linear", "case": case, "ratio": "reference/fused", **_goal(t["reference"] / t["fused"], ">=", 1.3)})
                    if cuda:
                        x, W, b, U, C = sets[0]
                        gf = _graph_ms(lambda: lowrank_linear(x, W, b, U, C), device)
                        gl = _graph_ms(lambda: F.linear(x, W, b), device)
                        gr = _graph_ms(lambda: lb.lowrank_linear_reference(x, W, b, U, C), device)
                        rows.append({"suite": "lowrank_linear", "case": case + " (CUDA graph)", "ratio": "fused/F.linear", **_goal(gf / gl, "<=", 1.05)})
                        rows.append({"suite": "lowrank_linear", "case": case + " (CUDA graph)", "ratio": "reference/fused", **_goal(gr / gf, ">=", 1.3)})
                else:
                    rows.append({"suite": "lowrank_linear", "case": case, "ratio": "fused/F.linear", **_goal(t["fused"] / t["F.linear"], "<=", 1.08)})
    for k in bs["k"]:
        for M in bs["train_M"]:
            sets, peft = lb.make_case(M, d, k, dtype, device)
            if peft[0] is None:
                rows.append({"suite": "lowrank_linear", "case": f"train M={M} k={k}", "ratio": "peft/fused", "value": None,
                             "goal": ">= 1.2", "met": False, "note": "peft not installed"})
                continue
            tf = _time(lb.case_fn("fused", "train", sets, peft), device)
            tp = _time(lb.case_fn("peft", "train", sets, peft), device)
            rows.append({"suite": "lowrank_linear", "case": f"train M={M} k={k} d={d}", "ratio": "peft/fused", **_goal(tp / tf, ">=", 1.2)})
    k = bs["mt_k"]
    with torch.no_grad():
        for T in bs["mt_T"]:
            w = mb.make_weights(T, d, k, dtype, device)
            C0 = w["cores"][0] @ w["V"].t()
            for n in bs["mt_rows"]:
                x = torch.randn(n, d, device=device, dtype=dtype)
                ids = mb.make_ids("uniform", n, T, device)
                share = lambda: multi_task_linear(x, w["W"], w["b"], w["U"], w["cores"], w["V"], ids, check_ids=False)  # noqa: E731
                single = lambda: lowrank_linear(x, w["W"], w["b"], w["U"], C0)  # noqa: E731
                ts, t1 = _time(share, device), _time(single, device)
                case = f"T={T} rows={n} uniform k={k} d={d}"
                if T >= 1024 or not cuda:
                    rows.append({"suite": "multi_task_linear", "case": case, "ratio": "share/single", **_goal(ts / t1, "<=", 1.15)})
                    if cuda and n <= 16:
                        gs, g1 = _graph_ms(share, device), _graph_ms(single, device)
                        rows.append({"suite": "multi_task_linear", "case": case + " (CUDA graph)", "ratio": "share/single", **_goal(gs / g1, "<=", 1.15)})
                if T >= 16 and T <= 64:
                    peft = mb.peft_model(w, T)
                    if peft is None:
                        rows.append({"suite": "multi_task_linear", "case": case, "ratio": "peft/share", "value": None,
                                     "goal": ">= 10", "met": False, "note": "peft not installed"})
                        continue
                    names = [f"t{int(t) % T}" for t in ids.tolist()]
                    tp = _time(lambda: peft(x, adapter_names=names), device)
                    rows.append({"suite": "multi_task_linear", "case": case, "ratio": "peft/share", **_goal(tp / ts, ">=", 10.0)})
    return rows


def _suites(device, out_dir, deadline) -> list[dict]:
    """The other suites, each in a subprocess given what is left of the budget."""
    res = []
    preset = "full" if device.type == "cuda" else "quick"
    for name in SUITES_AFTER:
        left = deadline - time.perf_counter()
        if left < 15:
            res.append({"suite": name, "ok": False, "budget": True, "note": "not run: out of time budget"})
            continue
        cmd = [sys.executable, "-m", "share_kernels.cli", "bench", name, "--device", device.type, "--preset", preset,
               "--out", os.path.join(out_dir, "bench")]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            ok = proc.returncode == 0
            note = f"{preset} preset, {time.perf_counter() - t0:.0f} s" + ("" if ok else f"; rc {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }")
            table = proc.stdout.split(f"== {name} ==")[-1].strip() if ok else ""
            budget = False
        except subprocess.TimeoutExpired:
            ok, budget, table = False, True, ""
            note = f"stopped at the time budget after {time.perf_counter() - t0:.0f} s"
        res.append({"suite": name, "ok": ok, "budget": budget, "note": note, "table": table})
    return res


# --- the command --------------------------------------------------------------------------------


def _report_md(rep: dict) -> str:
    e = rep["environment"]
    lines = [f"# share-kernels gpu-check: {e['device']}, {e['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in e.items()]
    lines += ["", f"**Result: {'PASS' if rep['ok'] else 'FAIL'}**, {rep['elapsed_s']:.0f} s of a {rep['budget_s']:.0f} s budget", "",
              "## Phases", "", "| phase | seconds | ok |", "|---|---:|---|"]
    lines += [f"| {p} | {v['seconds']:.1f} | {'yes' if v['ok'] else 'NO'} |" for p, v in rep["phases"].items()]
    c = rep.get("compile")
    if c:
        lines += ["", "## Triton compiles", "",
                  f"{c['compiles']} of {c['planned']} planned kernel configurations compiled for {c['target']}, {c['jobs']} worker processes: "
                  f"{c['wall_s']} s wall ({c['summed_s']} s summed); not fitting: {len(c['not_fitting'])}"]
        lines += [f"- {n}" for n in c["not_fitting"]]
        if c.get("cache_fill_errors"):
            lines += [f"Cache fill errors (kernels compile at first use instead): {len(c['cache_fill_errors'])}, first: "
                      f"{c['cache_fill_errors'][0]}"]
        if "loaded_after_run" in c:
            lines += [f"Kernels held by the JIT caches after the run: {c['loaded_after_run']}"]
    lines += ["", "## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {t['check']} | {'yes' if t['ok'] else 'NO'} | {t['detail']} |" for t in rep.get("checks", [])]
    lines += ["", "## Goals", "", "| suite | case | ratio | value | goal | met |", "|---|---|---|---:|---|---|"]
    for r in rep.get("goals", []):
        v = "n/a" if r.get("value") is None else f"{r['value']:.3g}"
        lines.append(f"| {r['suite']} | {r['case']} | {r['ratio']} | {v} | {r['goal']} | {'met' if r['met'] else 'MISSED'} |")
    for s in rep.get("suites", []):
        lines += ["", f"## Suite {s['suite']} ({'ok' if s['ok'] else 'NOT OK'}: {s['note']})"]
        if s.get("table"):
            lines += ["", "```", s["table"], "```"]
    lines += ["", "## Failures", ""] + ([f"- {f}" for f in rep["failures"]] or ["none"])
    if rep.get("not_measured"):
        lines += ["", "## Not measured (time budget)", ""] + [f"- {n}" for n in rep["not_measured"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import torch

    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels run on CPU tensors only through Triton's interpreter, which must be chosen
        # before triton is imported: run again in a fresh process with it on.
        env = dict(os.environ, TRITON_INTERPRET="1", SHARE_KERNELS_CPU_BACKEND="triton")
        argv = [sys.executable, "-m", "share_kernels.cli", "gpu-check", "--out", args.out, "--device", "cpu",
                "--budget", str(args.budget)] + (["--jobs", str(args.jobs)] if args.jobs else []) + (["--no-suites"] if args.no_suites else []) \
            + (["--max-compiles", str(args.max_compiles)] if args.max_compiles is not None else [])
        return subprocess.call(argv, env=env)
    device = torch.device(dev_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (use --device cpu for the CPU run)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ["SHARE_KERNELS_CPU_BACKEND"] = "triton"
        from .kernels.interpreter import patch_bf16

        patch_bf16()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget
    torch.manual_seed(0)
    rep = {"environment": _environment(device), "budget_s": args.budget, "phases": {}, "failures": []}

    def phase(name, fn):
        t0 = time.perf_counter()
        try:
            val = fn()
            ok = True
        except Exception as e:
            val, ok = None, False
            rep["failures"].append(f"{name}: {type(e).__name__}: {e}".splitlines()[0][:500])
        rep["phases"][name] = {"seconds": round(time.perf_counter() - t0, 1), "ok": ok}
        print(f"[gpu-check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        return val

    rep["build"] = phase("build", _build)
    rep["compile"] = phase("compile", lambda: _compile(device, args.jobs, args.max_compiles))
    if rep["compile"] and not rep["compile"]["ok"]:
        rep["phases"]["compile"]["ok"] = False
        rep["failures"] += [f"compile: {n}" for n in rep["compile"]["not_fitting"]]
    rep["checks"] = phase("tests", lambda: _checks(device)) or []
    bad = [c for c in rep["checks"] if not c["ok"]]
    if bad:
        rep["phases"]["tests"]["ok"] = False
        rep["failures"] += [f"test {c['check']}: {c['detail']}" for c in bad]
    rep["goals"] = phase("bench", lambda: _bench(device)) or []
    if not args.no_suites:
        rep["suites"] = phase("suites", lambda: _suites(device, args.out, deadline)) or []
        # A suite the budget cut short is reported (not measured), not a failure; one that failed is.
        rep["failures"] += [f"suite {s['suite']}: {s['note']}" for s in rep["suites"] if not s["ok"] and not s["budget"]]
        rep["not_measured"] = [f"suite {s['suite']}: {s['note']}" for s in rep["suites"] if s["budget"]]
    if device.type == "cuda" and rep.get("compile"):
        rep["compile"]["loaded_after_run"] = _jit_cache_sizes()
    rep["elapsed_s"] = round(time.perf_counter() - start, 1)
    if rep["elapsed_s"] > args.budget:
        rep["failures"].append(f"elapsed {rep['elapsed_s']:.0f} s exceeds the {args.budget:.0f} s budget")
    missed = [r for r in rep["goals"] if not r["met"]]
    rep["goals_met"], rep["goals_missed"] = len(rep["goals"]) - len(missed), len(missed)
    # Goals are reported, not failures: a missed speed goal is a finding, not a broken build.
    rep["ok"] = not rep["failures"]
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(_report_md(rep))
    print(f"[gpu-check] {'PASS' if rep['ok'] else 'FAIL'} in {rep['elapsed_s']:.0f} s; goals met {rep['goals_met']}, "
          f"missed {rep['goals_missed']}; wrote {args.out}/gpu_check.md and gpu_check.json", flush=True)
    for f_ in rep["failures"]:
        print(f"  FAIL {f_}")
    return 0 if rep["ok"] else 1


def _jit_cache_sizes() -> dict:
    """Kernels each Triton JIT function holds after the run (compiled or read from the cache)."""
    import importlib

    from triton.runtime.jit import JITFunction

    from .kernels import aot

    sizes = {}
    for name, (mod, attr) in aot.KERNELS.items():
        fn = getattr(importlib.import_module(mod), attr)
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        try:
            sizes[name] = sum(len(v[0]) for v in fn.device_caches.values())
        except Exception:
            sizes[name] = "unknown"
    return sizes
