"""``share-kernels compress``: many peft LoRA adapters -> one Share adapter directory, and a report.

The shared subspace needs only the adapters' factors, not the base model's weights: each
adapted layer is stood in for by a shape-only ``nn.Linear`` (its weight a zero-stride view, no
memory), the layers are built as in :func:`~share_kernels.continual.peft_io.from_peft_adapters`,
and :func:`~share_kernels.continual.io.save_adapters` writes the result. Load it onto the real
base model with ``share_kernels.load_adapters(model, out)``, which wraps the same layer names and
checks every shape. ``base`` (a model name or directory whose ``config.json`` transformers can
read) checks the adapters' layer names and shapes against that model before anything is written,
without loading its weights (the model is built on the meta device).

The report: bytes of the adapters read against the directory written, the k of every layer,
and per adapter and per layer ``‖dW − dŴ‖_F / ‖dW‖_F``, dW = the adapter's scaled update ``s B A``
and dŴ = the Share task's, as stored.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .io import CONFIG_FILE, SHARED_FILE, atomic_write, save_adapters, saved_files, task_file
from .peft_io import LayerFit, PeftLora, check_compatible, check_model_layers, ingest, read_peft_adapters
from .wrap import adapter_layers

REPORT_FILE = "compress_report.json"


@dataclass
class CompressionReport:
    """What compressing cost. ``error[adapter][layer] = ‖dW − dŴ‖_F / ‖dW‖_F``; ``norm`` the
    ``‖dW‖_F``; ``k[layer]`` the subspace size kept; ``stacked_rank[layer]`` the rank of the
    stacked factors (k at least this is exact); ``input_bytes[adapter]`` its files read;
    ``output_bytes`` the files written (0 for an in-memory compression); ``task_bytes`` one task
    file's size and ``shared_bytes`` the shared file's."""

    adapters: list[str]
    k_requested: Union[int, float]
    p: int
    k: dict[str, int]
    stacked_rank: dict[str, int]
    rank: dict[str, int]
    error: dict[str, dict[str, float]]
    norm: dict[str, dict[str, float]]
    input_bytes: dict[str, int]
    output_bytes: int = 0
    shared_bytes: int = 0
    task_bytes: Optional[dict[str, int]] = None

    def adapter_error(self, name: str) -> float:
        """Relative error over all layers: ``sqrt(Σ_l ‖dW_l − dŴ_l‖²) / sqrt(Σ_l ‖dW_l‖²)``."""
        num = sum((self.error[name][n] * self.norm[name][n]) ** 2 for n in self.k)
        den = sum(self.norm[name][n] ** 2 for n in self.k)
        return math.sqrt(num / den) if den > 0 else math.sqrt(num)

    def layer_errors(self, layer: str) -> list[float]:
        return [self.error[a][layer] for a in self.adapters]

    @property
    def total_input_bytes(self) -> int:
        return sum(self.input_bytes.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter_error"] = {a: self.adapter_error(a) for a in self.adapters}
        return d

    def __str__(self) -> str:
        ks = sorted(set(self.k.values()))
        kdesc = str(ks[0]) if len(ks) == 1 else f"{ks[0]}..{ks[-1]} (per layer below)"
        lines = [
            f"{len(self.adapters)} peft LoRA adapters, {len(self.k)} layers -> one Share subspace per layer: "
            f"k = {kdesc} (requested {self.k_requested}), p = {self.p}",
        ]
        if self.output_bytes:
            lines.append(
                f"bytes: adapters read {self.total_input_bytes:,} B -> written {self.output_bytes:,} B "
                f"({self.output_bytes / max(self.total_input_bytes, 1):.3g}x); shared U, V {self.shared_bytes:,} B"
            )
        w = max(len("adapter"), *(len(a) for a in self.adapters))
        lines += ["", f"{'adapter':<{w}}  rank  input bytes  task bytes  rel. error of dW  worst layer (error)"]
        for a in self.adapters:
            worst = max(self.error[a], key=self.error[a].get)
            tb = f"{self.task_bytes[a]:,}" if self.task_bytes else "-"
            lines.append(
                f"{a:<{w}}  {self.rank[a]:>4}  {self.input_bytes[a]:>11,}  {tb:>10}  {self.adapter_error(a):>16.3g}  "
                f"{worst} ({self.error[a][worst]:.3g})"
            )
        w = max(len("layer"), *(len(n) for n in self.k))
        lines += ["", f"{'layer':<{w}}  stacked rank    k  mean rel. error  max rel. error"]
        for n in self.k:
            e = self.layer_errors(n)
            lines.append(
                f"{n:<{w}}  {self.stacked_rank[n]:>12}  {self.k[n]:>3}  {sum(e) / len(e):>15.3g}  {max(e):>14.3g}"
            )
        return "\n".join(lines)


def make_report(
    adapters: Sequence[PeftLora], fits: Sequence[LayerFit], k_requested: Union[int, float], p: int
) -> CompressionReport:
    return CompressionReport(
        adapters=[a.name for a in adapters],
        k_requested=k_requested,
        p=p,
        k={f.name: f.k for f in fits},
        stacked_rank={f.name: f.stacked_rank for f in fits},
        rank={a.name: max(a.rank(n) for n in a.layers) for a in adapters},
        error={a.name: {f.name: f.error[a.name] for f in fits} for a in adapters},
        norm={a.name: {f.name: f.norm[a.name] for f in fits} for a in adapters},
        input_bytes={a.name: a.nbytes for a in adapters},
    )


def error_curve(fits: Sequence[LayerFit]) -> dict[str, list[float]]:
    """Per adapter, its relative error over all layers (as :meth:`CompressionReport.adapter_error`)
    had every layer kept k directions, for each k of the fits' ``curve_ks`` (float64, before any
    dtype rounding)."""
    acc: dict[str, list[list[float]]] = {}
    for f in fits:
        if f.curve_ks != fits[0].curve_ks or not f.curve:
            raise ValueError("error_curve needs fits made with the same curve_ks (ingest(..., curve_ks=...))")
        for a, rows in f.curve.items():
            tot = acc.setdefault(a, [[0.0, 0.0] for _ in rows])
            for i, (num, den) in enumerate(rows):
                tot[i][0] += num
                tot[i][1] += den
    return {a: [math.sqrt(n / d) if d > 0 else math.sqrt(n) for n, d in rows] for a, rows in acc.items()}


def curve_ks(adapters: Sequence[PeftLora]) -> list[int]:
    """k from 1 to the largest useful k (a layer's summed adapter ranks, at most min(d_in, d_out)):
    every k up to 64, about 48 geometric steps beyond."""
    top = max(
        min(sum(a.rank(n) for a in adapters), *adapters[0].shape(n)) for n in adapters[0].layers
    )
    if top <= 64:
        return list(range(1, top + 1))
    return sorted({max(1, round(top ** (i / 47))) for i in range(48)} | {top})


def plot_error_curve(curve: dict[str, list[float]], ks: Sequence[int], path: str, chosen: Sequence[int] = ()) -> None:
    """PNG of each adapter's relative error against k (lines; beyond 12 adapters their mean and
    range), with the chosen k marked. Needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or the extra: pip install 'share-kernels[continual]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if len(curve) <= 12:
        for a, ys in curve.items():
            ax.plot(ks, ys, marker="." if len(ks) <= 40 else None, label=a)
    else:
        rows = torch.tensor(list(curve.values()))
        ax.fill_between(ks, rows.min(0).values, rows.max(0).values, alpha=0.25, label=f"range ({len(curve)} adapters)")
        ax.plot(ks, rows.mean(0), label="mean")
    for c in sorted(set(chosen)):
        ax.axvline(c, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("k (shared directions per layer)")
    ax.set_ylabel("relative error of dW, all layers")
    ax.set_ylim(bottom=0)
    ax.set_title("Share compression of peft adapters: error against k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.png")
    try:
        fig.savefig(tmp, format="png")
        with open(tmp, "rb") as f:
            data = f.read()
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write(path, data)


class _Container(nn.Module):
    pass


def skeleton_model(shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A module tree with a shape-only ``nn.Linear`` (no memory: a zero-stride weight) at each
    ``{name: (d_in, d_out)}``; it stands in for the base model when only adapters are at hand."""
    root = _Container()
    for name, (d_in, d_out) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if isinstance(child, nn.Linear):
                raise ValueError(f"layer {name!r} lies inside another adapted layer")
            if child is None:
                child = _Container()
                parent.add_module(part, child)
            parent = child
        if leaf in parent._modules:
            raise ValueError(f"layer {name!r} is also the parent of another adapted layer")
        lin = nn.Linear(d_in, d_out, bias=False, device="meta")
        lin.weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(d_out, d_in), requires_grad=False)
        parent.add_module(leaf, lin)
    return root


_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def check_base_model(base: str, adapters: Sequence[PeftLora]) -> None:
    """Build ``base``'s architecture from its config on the meta device (no weights) and check
    the adapters' layer names and shapes against it. The class tried first is the one peft
    recorded (``auto_mapping.base_model_class``), then the one the adapters' ``task_type``
    implies (``AutoModelForCausalLM`` for ``CAUSAL_LM``, ...), the config's ``architectures``,
    and ``AutoModel``; the first whose module names hold every adapted layer is checked."""
    try:
        import transformers
    except ImportError:
        raise ImportError("--base needs transformers: pip install transformers") from None
    shapes = check_compatible(adapters)
    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except Exception as e:  # not found locally, no hub access, not a transformers config
        raise ValueError(f"--base {base!r}: cannot read its config with transformers.AutoConfig ({e})") from None
    cfg0 = adapters[0].config
    names = [
        (cfg0.get("auto_mapping") or {}).get("base_model_class"),
        _AUTO_CLASS.get(cfg0.get("task_type")),
        *(getattr(config, "architectures", None) or []),
        "AutoModel",
    ]
    models = []
    for name in dict.fromkeys(n for n in names if n):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                model = cls.from_config(config) if name.startswith("Auto") else cls(config)
        except Exception:  # a class that does not fit this config
            continue
        modules = {n for n, _ in model.named_modules()}
        if all(n in modules for n in shapes):
            check_model_layers(model, shapes, base)
            return
        models.append(model)
    if not models:
        raise ValueError(f"--base {base!r}: transformers cannot build a model from its config")
    check_model_layers(models[0], shapes, base)  # raises, naming the missing layers


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


def parse_adapter_args(args: Sequence[str]) -> Union[list[str], dict[str, str]]:
    """The command's ``ADAPTER_DIR`` / ``NAME=DIR`` arguments: a list of directories (tasks named
    after them), or, when any argument names its task, a ``{name: dir}`` mapping. An argument
    that is itself an existing path is a directory even if it contains ``=``."""
    named: dict[str, str] = {}
    any_named = False
    for a in args:
        name, sep, path = a.partition("=")
        if sep and not os.path.exists(a):
            if not name or not path:
                raise ValueError(f"adapter argument {a!r}: expected ADAPTER_DIR or NAME=ADAPTER_DIR")
            any_named = True
        else:
            name, path = os.path.basename(os.path.normpath(a)), a
        if name in named:
            raise ValueError(
                f"two adapters would be named {name!r} ({named[name]!r} and {path!r}); name them apart with NAME=DIR"
            )
        named[name] = path
    return named if any_named else list(args)


def compress(
    adapter_dirs: Union[Sequence[str], dict],
    k: Union[int, float, str],
    out: Union[str, os.PathLike],
    *,
    p: Optional[int] = None,
    base: Optional[Union[str, os.PathLike]] = None,
    plot: Optional[Union[str, os.PathLike]] = None,
    max_k: int = 64,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> CompressionReport:
    """Compress peft LoRA adapter directories into one Share adapter directory ``out``.

    ``k``, ``p``, ``max_k``, ``device`` (where the SVDs run, default CPU) as in
    :func:`~share_kernels.continual.peft_io.from_peft_adapters`.
    Writes ``out/`` as :func:`~share_kernels.continual.io.save_adapters` does (load it with
    ``share_kernels.load_adapters(base_model, out)``) plus ``out/compress_report.json``; ``plot``
    a PNG of the error against k. Returns the report.
    """
    out = os.fspath(out)  # str or os.PathLike, as every path argument
    plot = None if plot is None else os.fspath(plot)
    base = None if base is None else os.fspath(base)
    bar = None
    if progress:
        tqdm = _tqdm()

        def bar(it, **kw):
            return tqdm(it, leave=False, **kw)

    adapters = read_peft_adapters(adapter_dirs, progress=bar)
    if base is not None:
        check_base_model(base, adapters)
    if plot is not None:  # fail before the work, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    shapes = check_compatible(adapters)
    model = skeleton_model(shapes)  # U, V and the coefficients are stored in float32
    ks = curve_ks(adapters) if plot is not None else None
    fits = ingest(model, adapters, k, p, max_k=max_k, progress=bar, curve_ks=ks, device=device)
    layer = next(iter(adapter_layers(model).values()))
    report = make_report(adapters, fits, model.continual_config.k, layer.p)
    save_adapters(model, out)
    files = saved_files(out)
    report.shared_bytes = os.path.getsize(files[SHARED_FILE])
    report.task_bytes = {a: os.path.getsize(files[task_file(a)]) for a in report.adapters}
    report.output_bytes = (
        report.shared_bytes + sum(report.task_bytes.values()) + os.path.getsize(os.path.join(out, CONFIG_FILE))
    )
    doc = report.to_dict()
    doc["sources"] = model.peft_sources
    atomic_write(os.path.join(out, REPORT_FILE), json.dumps(doc, indent=2).encode())
    if plot is not None:
        plot_error_curve(error_curve(fits), ks, plot, chosen=sorted(set(report.k.values())))
    return report


__all__ = [
    "CompressionReport",
    "check_base_model",
    "compress",
    "curve_ks",
    "error_curve",
    "make_report",
    "plot_error_curve",
    "skeleton_model",
]
