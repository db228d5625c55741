"""Metrics of an accuracy matrix, the printed tables, the JSON and the PNG.

``a[i][j]``: accuracy on task j after training task i (None above the diagonal). With T tasks:

- average accuracy: ``mean_j a[T-1][j]``;
- backward transfer: ``BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])`` (negative: forgetting);
- forgetting: ``mean_{j<T-1} max_{j<=i<T-1} (a[i][j] - a[T-1][j])`` (Chaudhry et al. 2018).

A method trained once on all tasks (joint) has only the last row: BWT and forgetting are None.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from ..continual.io import atomic_write

Matrix = Sequence[Sequence[Optional[float]]]


def average_accuracy(a: Matrix) -> Optional[float]:
    last = a[-1]
    if any(v is None for v in last):
        return None
    return sum(last) / len(last)


def backward_transfer(a: Matrix) -> Optional[float]:
    T = len(a)
    if T < 2 or any(a[j][j] is None for j in range(T - 1)):
        return None
    return sum(a[T - 1][j] - a[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(a: Matrix) -> Optional[float]:
    T = len(a)
    if T < 2 or any(a[j][j] is None for j in range(T - 1)):
        return None
    return sum(max(a[i][j] for i in range(j, T - 1)) - a[T - 1][j] for j in range(T - 1)) / (T - 1)


def curve(a: Matrix) -> list[Optional[float]]:
    """Average accuracy over the tasks seen so far, after each task (None where not measured)."""
    out = []
    for i, row in enumerate(a):
        seen = row[: i + 1]
        out.append(None if any(v is None for v in seen) else sum(seen) / len(seen))
    return out


def summarize(a: Optional[Matrix]) -> Optional[dict]:
    if a is None:
        return None
    return {
        "matrix": [list(r) for r in a],
        "average_accuracy": average_accuracy(a),
        "backward_transfer": backward_transfer(a),
        "forgetting": forgetting(a),
        "curve": curve(a),
    }


def _pct(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 1e3:.1f} KB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def summary_table(results: dict) -> str:
    """One line per method: both protocols' average accuracy, BWT and forgetting (points),
    trainable parameters and stored bytes per task, total stored bytes, wall time."""
    head = (
        "| method | TI avg acc | TI BWT | TI forgetting | CI avg acc | CI BWT | CI forgetting "
        "| trainable / task | stored / task | stored total | wall |"
    )
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for name, r in results["methods"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} |" + " - |" * (ncols - 2))
            continue
        ti, ci = r["task_incremental"], r["class_incremental"]
        cells = [
            name,
            _pct(ti["average_accuracy"]),
            _pct(ti["backward_transfer"], True),
            _pct(ti["forgetting"]),
            _pct(ci["average_accuracy"]) if ci else "n/a (needs task id)",
            _pct(ci["backward_transfer"], True) if ci else "-",
            _pct(ci["forgetting"]) if ci else "-",
            f"{r['trainable_per_task']:,}",
            _bytes(r["stored_bytes_per_task"]),
            _bytes(r["stored_bytes_total"]),
            f"{r['wall_s']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(name: str, protocol: str, a: Matrix, task_names: Sequence[str]) -> str:
    w = max(8, *(len(t) + 1 for t in task_names))
    lines = [f"{name}, {protocol}: a[i][j] (%), row i = after training task i"]
    lines.append(" " * w + "".join(f"{t:>{w}}" for t in task_names))
    for i, row in enumerate(a):
        lines.append(f"{task_names[i]:<{w}}" + "".join(f"{_pct(v):>{w}}" for v in row))
    return "\n".join(lines)


def format_report(results: dict) -> str:
    names = [t["name"] for t in results["tasks"]]
    parts = []
    for name, r in results["methods"].items():
        if r["status"] != "ok":
            continue
        parts.append(matrix_table(name, "task-incremental", r["task_incremental"]["matrix"], names))
        if r["class_incremental"]:
            parts.append(matrix_table(name, "class-incremental", r["class_incremental"]["matrix"], names))
    heads = ", ".join(f"{t['name']} {t['head_params']}" for t in results["tasks"])
    parts.append(
        "TI: task-incremental (task id known), CI: class-incremental (no task id). Accuracy, BWT and "
        f"forgetting in points; trainable / stored: adapter parameters, {results['config'].get('dtype', 'float32')} "
        "bytes (the heads, the "
        f"same for every method, are not counted: {heads} parameters)."
    )
    parts.append(summary_table(results))
    return "\n\n".join(parts)


def write_json(results: dict, path: str) -> None:
    atomic_write(path, json.dumps(results, indent=2).encode())


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def write_long_png(results: dict, path: str) -> None:
    """Long streams: mean accuracy over the tasks seen after each task (both protocols), Share's
    k and InfLoRA's protected input dimension per layer over the stream, and every method's
    total stored adapter bytes after each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results["methods"].items() if r["status"] == "ok"}
    T = len(results["tasks"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, protocol in zip(axes[0], ("task_incremental", "class_incremental")):
        for name, r in ok.items():
            s = r[protocol]
            if s is None:
                continue
            pts = [(i + 1, 100 * v) for i, v in enumerate(s["curve"]) if v is not None]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_title(protocol.replace("_", "-") + ": mean accuracy over tasks seen")
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(range(1, T + 1, max(1, T // 10)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    for name, r in ok.items():
        for key, style, what in (("k", "-", "k"), ("protected", ":", "protected dim")):
            per = [a.get(key) for a in r.get("after_task") or []]
            if not per or per[0] is None:
                continue
            for layer in per[0]:
                ys = [p[layer] for p in per]
                ax.plot(range(1, len(ys) + 1), ys, style, marker=".", label=f"{name} {what}: {layer}")
    ax.set_title("per adapted layer: Share's k, InfLoRA's protected input dimension")
    ax.set_xlabel("tasks trained")
    ax.set_xticks(range(1, T + 1, max(1, T // 10)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1][1]
    for name, r in ok.items():
        per = [a["stored_bytes"] / 1e3 for a in r.get("after_task") or []]
        if per and len(per) == T:
            ax.plot(range(1, T + 1), per, marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_title("stored adapter bytes after each task (heads excluded)")
    ax.set_xlabel("tasks trained")
    ax.set_xticks(range(1, T + 1, max(1, T // 10)))
    ax.set_ylabel("KB")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_png(results: dict, path: str) -> None:
    """Accuracy after each task per method (both protocols) and the accuracy-matrix heatmaps;
    streams of more than 8 tasks get :func:`write_long_png` instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results["methods"].items() if r["status"] == "ok"}
    names = [t["name"] for t in results["tasks"]]
    T = len(names)
    if T > 8:
        return write_long_png(results, path)
    n = max(len(ok), 1)
    fig = plt.figure(figsize=(max(10, 3.2 * n), 12.5))
    grid = fig.add_gridspec(3, max(n, 2))
    for k, protocol in enumerate(("task_incremental", "class_incremental")):
        half = max(n, 2) // 2
        ax = fig.add_subplot(grid[0, k * half : (k + 1) * half if k == 0 else max(n, 2)])
        for name, r in ok.items():
            s = r[protocol]
            if s is None:
                continue
            ys = [None if v is None else 100 * v for v in s["curve"]]
            xs = [i + 1 for i, v in enumerate(ys) if v is not None]
            ax.plot(xs, [v for v in ys if v is not None], marker="o", label=name)
        ax.set_title(protocol.replace("_", "-") + ": mean accuracy over tasks seen")
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for row, protocol in ((1, "task_incremental"), (2, "class_incremental")):
        for col, (name, r) in enumerate(ok.items()):
            ax = fig.add_subplot(grid[row, col])
            s = r[protocol]
            if s is None:
                ax.set_axis_off()
                ax.set_title(f"{name}\n{protocol.split('_')[0]}-inc.: needs task id", fontsize=9)
                continue
            m = [[float("nan") if v is None else 100 * v for v in rr] for rr in s["matrix"]]
            ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            for i in range(T):
                for j in range(T):
                    if m[i][j] == m[i][j]:
                        ax.text(j, i, f"{m[i][j]:.0f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_title(f"{name}\n{protocol.split('_')[0]}-incremental", fontsize=9)
            ax.set_xticks(range(T), names, rotation=60, fontsize=7)
            ax.set_yticks(range(T), names, fontsize=7)
            ax.set_xlabel("evaluated on task j", fontsize=7)
            if col == 0:
                ax.set_ylabel("after task i", fontsize=7)
    _save(fig, path)
