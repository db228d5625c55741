"""Timing and reporting helpers shared by the benchmark suites.

GPU timing is ``triton.testing.do_bench`` (median, L2 flushed between calls) over input sets
rotated so that consecutive calls never reuse the same buffers; CPU timing is the median of
``time.perf_counter`` over repeated calls. Every suite reports ratios against baselines timed
in the same run, never absolute targets.
"""
from __future__ import annotations

import datetime
import itertools
import platform
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotating(fn: Callable, input_sets: Sequence[tuple]) -> Callable[[], object]:
    """A no-argument callable that calls ``fn(*s)`` on the next input set each time."""
    cycle = itertools.cycle(input_sets)
    return lambda: fn(*next(cycle))


def time_ms(fn: Callable[[], object], device: torch.device, *, min_reps: int = 5, budget_s: float = 1.0) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(int(budget_s * 1000 * 0.5), 100), return_mode="median"))
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak device memory allocated during one call of ``fn`` above what was live before (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-same-device copy bandwidth in GB/s (read + write), measured now."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = [torch.empty(n, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    dst = torch.empty(n, dtype=torch.float32, device=device)
    ms = time_ms(rotating(dst.copy_, [(s,) for s in src]), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    return info


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict], width: int = 120) -> str:
    """Plain-text table over the union of the rows' keys, in first-seen order, at most ``width``
    characters wide: the columns that do not fit go to a further block that repeats the case
    column; a ``note`` column is printed under the table, once per distinct note."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    notes = list(dict.fromkeys(str(r["note"]) for r in rows if r.get("note"))) if "note" in cols else []
    cols = [c for c in cols if c != "note"]
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    key = [0] if cols and cols[0] == "case" else []
    blocks, cur, used = [], [], sum(widths[i] + 2 for i in key)
    for i in range(len(cols)):
        if i in key:
            continue
        if cur and used + widths[i] + 2 > width:
            blocks.append(cur)
            cur, used = [], sum(widths[i] + 2 for i in key)
        cur.append(i)
        used += widths[i] + 2
    blocks.append(cur)

    def line(vals, idx):
        return "  ".join(vals[j].ljust(widths[j]) if j in key else vals[j].rjust(widths[j]) for j in idx)

    out = []
    for b in blocks:
        idx = key + b
        part = [line(cols, idx), line(["-" * w for w in widths], idx)] + [line(r, idx) for r in cells]
        out.append("\n".join(s.rstrip()[:width] for s in part))
    text = "\n\n".join(out)
    if notes:
        text += "\n" + "\n".join(f"note: {n}" for n in notes)
    return text
