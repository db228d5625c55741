"""Ahead-of-time compilation of the Triton kernels, with or without a GPU.

A *launch* is what a launcher would pass to its kernel for given operands (its
``kernel_args``); the autotuner's prune then says which configurations it may compile for
that launch. :func:`plan` turns launches into compile tasks (one per distinct kernel
specialisation and configuration) and :func:`compile_tasks` compiles them in parallel worker
processes through the kernels' own JIT path (``warmup``), for a given CUDA architecture:

* without a GPU (a stand-in Triton driver that reports the target), to read each cubin's
  registers, spill stack and shared memory: ``tests/test_sm90_fit.py`` and
  ``benchmarks/compile_report.py``;
* on a GPU, to fill the Triton cache before the autotuner asks for the same kernels (same
  specialisation, options and target, so the same cache key): ``share-kernels gpu-check``.

The operands of a launch are described by (dtype, shape, strides) and rebuilt as ``meta``
tensors: specialisation reads only their dtype, strides and (16-byte aligned) addresses.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

#: Shared memory one block may use on sm_90 (227 KB), the limit the fit test enforces.
SM90_MAX_SMEM = 232448

#: name: (module, kernel, prune, configurations the prune chooses from)
KERNELS = {
    "lowrank_linear": ("share_kernels.kernels.lowrank_linear", "_lowrank_linear_fwd_kernel", "_prune", "CONFIGS"),
    "lowrank_shrink": ("share_kernels.kernels.lowrank_linear", "_lowrank_shrink_kernel", "_prune_shrink",
                       "SHRINK_CONFIGS"),
    "lowrank_reduce": ("share_kernels.kernels.lowrank_linear", "_splitk_reduce_kernel", "_prune_reduce",
                       "REDUCE_CONFIGS"),
    "multi_task_core": ("share_kernels.kernels.multi_task_linear", "_multi_task_core_kernel", "_prune_core",
                        "CORE_CONFIGS"),
    "multi_task_linear": ("share_kernels.kernels.multi_task_linear", "_multi_task_expand_kernel", "_prune_expand",
                          "EXPAND_CONFIGS"),
    "stability_loss": ("share_kernels.kernels.stability_loss", "_stability_loss_kernel", "_prune", "CONFIGS"),
}


@dataclass(frozen=True)
class Task:
    """One compile: a kernel, its launch arguments (tensors as (dtype, shape, strides)), the
    constexpr keyword arguments, one autotune configuration, and a label for the report."""

    kernel: str
    args: tuple
    meta: tuple
    config: tuple  # (kwargs items, num_warps, num_stages)
    label: str = field(default="", compare=False)

    def key(self):
        """What Triton specialises on: tensor dtypes, ints by ==1 / %16 / width, constexprs."""
        spec = []
        for a in self.args:
            if isinstance(a, tuple):
                spec.append(a[0])
            elif isinstance(a, bool) or not isinstance(a, int):
                spec.append(type(a).__name__)
            else:
                spec.append("1" if a == 1 else ("i64" if abs(a) >= 2**31 else ("d16" if a % 16 == 0 else "i32")))
        return (self.kernel, tuple(spec), self.meta, self.config)

    def name(self) -> str:
        kw, warps, stages = self.config
        blocks = " ".join(f"{k.replace('BLOCK_', 'B')}={v}" for k, v in kw if k.startswith("BLOCK"))
        return f"{self.kernel} {self.label} {blocks} w{warps} s{stages}".replace("  ", " ")


def describe(args) -> tuple:
    """Launch arguments with tensors replaced by (dtype, shape, strides): picklable."""
    import torch

    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((str(a.dtype).replace("torch.", ""), tuple(a.shape), tuple(a.stride())))
        else:
            out.append(a)
    return tuple(out)


def _rebuild(args) -> list:
    import torch

    return [
        torch.empty_strided(a[1], a[2], dtype=getattr(torch, a[0]), device="meta") if isinstance(a, tuple) else a
        for a in args
    ]


def _module(kernel: str):
    import importlib

    return importlib.import_module(KERNELS[kernel][0])


def plan(kernel: str, args, meta: dict, label: str = "") -> list[Task]:
    """Compile tasks for one launch: every configuration the kernel's prune keeps for it."""
    import triton

    mod = _module(kernel)
    fn = getattr(mod, KERNELS[kernel][1])
    named = dict(zip(fn.arg_names, args))
    _, _, prune, configs = KERNELS[kernel]
    kept = getattr(mod, prune)(getattr(mod, configs), named, **meta)
    desc = describe(args)
    meta_t = tuple(sorted(meta.items()))
    tasks = []
    for cfg in kept:
        assert isinstance(cfg, triton.Config)
        tasks.append(Task(kernel, desc, meta_t, (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages), label))
    return tasks


def unique(tasks) -> list[Task]:
    seen, out = set(), []
    for t in tasks:
        if t.key() not in seen:
            seen.add(t.key())
            out.append(t)
    return out


class _TargetDriver:
    """Stands in for Triton's CUDA driver in a process without a GPU: reports a target, device 0."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _init_worker(arch: int, cache_dir: str | None) -> None:
    # Before triton.jit runs: under TRITON_INTERPRET the kernels would be interpreted functions.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = [ln for ln in out.splitlines() if "REG:" in ln][-1]
    fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields.get("LOCAL", 0))}


def _compile(task: Task) -> dict:
    t0 = time.perf_counter()
    mod = _module(task.kernel)
    jit = getattr(mod, KERNELS[task.kernel][1]).fn  # below the autotuner: one config
    kw, warps, stages = task.config
    try:
        ck = jit.warmup(*_rebuild(task.args), grid=(1,), **dict(task.meta), **dict(kw), num_warps=warps,
                        num_stages=stages)
    except Exception as e:  # reported per task; the caller fails on any
        return {"name": task.name(), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "seconds": time.perf_counter() - t0}
    res = {"name": task.name(), "smem": int(ck.metadata.shared), "wgmma": ck.asm["ptx"].count("wgmma.mma_async")}
    if "cubin" in ck.asm:
        res.update(_resource_usage(ck.asm["cubin"]))
    res["seconds"] = time.perf_counter() - t0
    return res


def compile_tasks(tasks, arch: int = 90, jobs: int | None = None, cache_dir: str | None = None) -> list[dict]:
    """Compile the tasks for sm_<arch> in ``jobs`` worker processes; one result dict per task
    (name, regs, stack, smem, wgmma, seconds, or error), in the tasks' order."""
    import multiprocessing

    jobs = jobs or os.cpu_count() or 1
    ctx = multiprocessing.get_context("spawn")
    # The workers re-import the parent's main module before the initializer runs: they must
    # not see TRITON_INTERPRET, or triton.jit would hand them interpreted functions.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(arch, cache_dir)) as pool:
            return list(pool.map(_compile, tasks))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def fits(res: dict, max_smem: int = SM90_MAX_SMEM) -> bool:
    """Compiled, no spill stack or local memory, shared memory within the per-block limit."""
    return "error" not in res and res.get("stack", 0) == 0 and res.get("local", 0) == 0 and res["smem"] <= max_smem


def format_table(results) -> str:
    lines = [f"{'kernel configuration':86s} {'regs':>4s} {'spill':>5s} {'smem':>7s} {'wgmma':>5s} {'s':>6s}  fit"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:86s} FAILED {r['error']}")
            continue
        lines.append(
            f"{r['name']:86s} {r.get('regs', -1):4d} {r.get('stack', -1):5d} {r['smem']:7d} {r['wgmma']:5d} "
            f"{r['seconds']:6.1f}  {'ok' if fits(r) else 'NO'}"
        )
    return "\n".join(lines)


# --- launches, built on meta tensors exactly as the ops build them ------------------------------


def lowrank_launches(dtype, M: int, d_in: int, d_out: int, k: int, direction: str = "fwd", bias: bool = True,
                     sms: int = 132):
    """The launches of ``lowrank_linear_forward`` in the op's ``direction``: "fwd" (y = x W^T +
    b + (x U) C), "dx_t" (the backward's dx with t = dy C^T stored for dU), "dx" (dx only):
    [(kernel name, args, meta)], the shrink first when the launcher uses it (M >= SHRINK_MIN_M
    without a stored t), or the split-K GEMM and its reduction at decode, with the splits a GPU
    of ``sms`` SMs (an H100's 132) gets."""
    import torch

    from .lowrank_linear import (
        SHRINK_MIN_M,
        _block_r,
        kernel_args,
        reduce_kernel_args,
        shrink_kernel_args,
        shrink_splits,
        w_splits,
    )

    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    W, U, C = e(d_out, d_in), e(d_in, k), e(k, d_out)
    if direction == "fwd":
        x, w, b, u, c, out, t = e(M, d_in), W, e(d_out) if bias else None, U, C, e(M, d_out), None
    else:
        x, w, b, u, c, out = e(M, d_out), W.t(), None, C.t(), U.t(), e(M, d_in)
        t = e(M, k, dt=torch.float32) if direction == "dx_t" else None
    launches, t_part = [], None
    if t is None and M >= SHRINK_MIN_M:
        splits = shrink_splits(M, x.shape[1], x.device, sms=sms)
        t_part = e(splits, M, _block_r(k), dt=torch.float32)
        launches.append(("lowrank_shrink", *shrink_kernel_args(x, u, t_part, splits)))
    splits = w_splits(M, out.shape[1], x.shape[1], x.device, sms=sms) if t is None and t_part is None else 1
    if splits > 1:  # decode split-K over W, then the reduction
        ws = e(splits, M, out.shape[1], dt=torch.float32)
        launches.append(("lowrank_linear", *kernel_args(x, w, b, u, c, out, None, None, ws)))
        launches.append(("lowrank_reduce", *reduce_kernel_args(ws, b, out)))
        return launches
    launches.append(("lowrank_linear", *kernel_args(x, w, b, u, c, out, t, t_part)))
    return launches


def plan_launches(launches, label: str = "") -> list[Task]:
    """:func:`plan` for every launch of a list [(kernel name, args, meta)]."""
    return [t for name, args, meta in launches for t in plan(name, args, meta, label)]


def multi_task_launch(dtype, M: int, d_in: int, d_out: int, k: int, T: int, grouped: bool = False):
    """The two launches of ``multi_task_delta_``: [(kernel name, args, meta)] for the core
    kernel and the expand kernel."""
    import torch

    from .lowrank_linear import shrink_splits
    from .multi_task_linear import buffers, core_kernel_args, expand_kernel_args

    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    ids = e(M, dt=torch.int64)
    order = e(M, dt=torch.int64) if grouped else None
    x = e(M, d_in)
    t_buf, s_buf = buffers(x, k, shrink_splits(M, d_in, x.device, sms=132))
    core = core_kernel_args(x, e(d_in, k), e(T, k, k), ids, t_buf, s_buf, 1, order)
    expand = expand_kernel_args(e(M, d_out), s_buf, e(d_out, k), ids, T, 1, order)
    return [("multi_task_core", *core), ("multi_task_linear", *expand)]


plan_multi_task = plan_launches

def stability_launch(dtype, r: int, d_in: int, d_out: int, with_grad: bool):
    import torch

    from .stability_loss import kernel_args, stability_loss_plan

    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    A, B, P = e(r, d_in), e(d_out, r), e(d_out, d_in)
    _, _, rows, loss_part, da_part, db_part = stability_loss_plan(A, B, with_grad)
    g = e((), dt=torch.float32) if with_grad else loss_part
    return kernel_args(A, B, P, g, loss_part, da_part, db_part, rows, 1.0, with_grad)


def fit_tasks() -> list[Task]:
    """Every configuration the launchers can select on CUDA, for every kernel, direction, dtype
    and rank bucket (deduplicated): what tests/test_sm90_fit.py compiles."""
    import torch

    tasks = []
    d = 4096
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).replace("torch.", "")
        for k in (16, 32, 64, 128):
            for M in (16, 256, 4096):  # decode, mid, prefill
                for direction in ("fwd", "dx_t", "dx"):
                    tasks += plan_launches(lowrank_launches(dt, M, d, d, k, direction), f"{name} {direction} k{k} M{M}")
            for M in (16, 4096):
                for grouped in (False, True):
                    tasks += plan_multi_task(multi_task_launch(dt, M, d, d, k, 8, grouped),
                                             f"{name} {'grouped' if grouped else 'gather'} k{k} M{M}")
    # ranks that are not a multiple of 16 (U and C with unaligned strides): LoRA's 8, and 5
    for k in (5, 8):
        for M in (16, 256, 4096):
            for direction in ("fwd", "dx_t"):
                tasks += plan_launches(lowrank_launches(torch.bfloat16, M, d, d, k, direction), f"bfloat16 {direction} k{k} M{M}")
            tasks += plan_multi_task(multi_task_launch(torch.bfloat16, M, d, d, k, 8, False), f"bfloat16 gather k{k} M{M}")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dt).replace("torch.", "")
        for r, n in ((16, 4096), (16, 1024), (32, 4096), (32, 1024), (64, 4096), (16, 4097)):
            for with_grad in (False, True):
                args, meta = stability_launch(dt, r, n, n, with_grad)
                tasks += plan("stability_loss", args, meta,
                              f"{name} {'grad' if with_grad else 'loss'} r{r} N{n} BN={meta['BLOCK_N']}")
    return unique(tasks)
