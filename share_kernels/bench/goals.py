"""The benchmark goals (README, Benchmarks) and their verdicts: met, missed or not measured.

A goal is a bound on one ratio column of one suite's rows that match a case filter; it is met
when every matching row satisfies it. The goals are stated for an H100/H200: on another device
the verdict is printed for reference, marked as such. One function, :func:`verdicts`, judges a
run; ``share-kernels bench`` prints it last.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Goal:
    suite: str
    text: str
    column: str
    bound: float
    at_most: bool  # True: column <= bound; False: column >= bound
    rows: Callable[[dict], bool]


def _case(pattern: str) -> Callable[[dict], bool]:
    rx = re.compile(pattern)
    return lambda row: bool(rx.search(str(row.get("case", ""))))


def _small_m(row: dict) -> bool:
    m = re.search(r"fwd M=(\d+) ", str(row.get("case", "")))
    return m is not None and int(m.group(1)) <= 16


def _t_at_least_16(row: dict) -> bool:
    m = re.search(r"T=(\d+) ", str(row.get("case", "")))
    return m is not None and int(m.group(1)) >= 16


GOALS = (
    Goal("lowrank_linear", "forward at M <= 16 within 1.05x of F.linear", "fused/F.linear", 1.05, True, _small_m),
    Goal("lowrank_linear", "forward at M <= 16 >= 1.3x faster than the reference", "reference/fused", 1.3, False,
         _small_m),
    Goal("lowrank_linear", "forward at M = 8192 within 1.08x of F.linear", "fused/F.linear", 1.08, True,
         _case(r"^fwd M=8192 ")),
    Goal("lowrank_linear", "training step >= 1.2x faster than peft", "peft/fused", 1.2, False, _case(r"^train ")),
    Goal("multi_task_linear", "T = 1024 uniform within 1.15x of single-task", "share/single", 1.15, True,
         _case(r"^T=1024 .*uniform")),
    Goal("multi_task_linear", "T >= 16 at least 10x faster than peft", "peft/share", 10.0, False, _t_at_least_16),
)


def verdicts(results: dict[str, list[dict]], device_type: str) -> list[dict]:
    """One dict per goal of a suite that ran: ``goal``, ``verdict`` ("met", "missed", "not
    measured"), ``worst`` (the worst value seen), ``rows`` (how many rows it judged), ``device_note``."""
    out = []
    for g in GOALS:
        if g.suite not in results:
            continue
        vals = [r[g.column] for r in results[g.suite] if g.rows(r) and isinstance(r.get(g.column), (int, float))]
        vals = [v for v in vals if not math.isnan(v)]
        if not vals:
            verdict, worst = "not measured", None
        else:
            worst = max(vals) if g.at_most else min(vals)
            verdict = "met" if (worst <= g.bound if g.at_most else worst >= g.bound) else "missed"
        out.append({
            "suite": g.suite, "goal": g.text, "column": g.column, "verdict": verdict, "worst": worst, "rows": len(vals),
            "device_note": "" if device_type == "cuda" else "(a GPU goal; this CPU run is for reference)",
        })
    return out


def format_verdicts(vs: list[dict]) -> str:
    """The closing summary: a count, then one line per goal (each at most ~110 characters)."""
    if not vs:
        return "Goals: none of the suites run has a stated goal."
    met = sum(v["verdict"] == "met" for v in vs)
    missed = sum(v["verdict"] == "missed" for v in vs)
    head = f"Goals: {met} met, {missed} missed, {len(vs) - met - missed} not measured {vs[0]['device_note']}"
    lines = [head.rstrip()]
    for v in vs:
        worst = "-" if v["worst"] is None else f"{v['worst']:.3g}"
        lines.append(f"  [{v['verdict'].upper():>12}] {v['suite']}: {v['goal']}")
        lines.append(f"{'':17}worst {v['column']} = {worst} over {v['rows']} row(s)")
    return "\n".join(lines)
