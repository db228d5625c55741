"""Share: parameter and storage accounting against per-task LoRA, and a training step against
HF peft's LoRA of the same rank.

Accounting rows: MiniLM-L6, RoBERTa-base and a Llama-2-7B shaped model (shapes from their
configs, no weights), every linear of every block adapted, at 10, 100 and 500 tasks, Share with
the default :class:`~share_kernels.continual.ShareConfig` (k=32, p=8, φ=2) against LoRA of rank
r=8, fp32 adapters (ratios do not depend on the dtype). "trainable" counts what one task trains
(its coefficients plus its temporary directions); "stored" what it adds on disk.

Training-step rows: an MLP block ``Linear(d, h) -> GELU -> Linear(h, d)`` with both linears
adapted, forward + backward (x requires grad, as mid-network) + AdamW step, for Share in its
steady state (a later task: coefficients plus φ temporary directions), Share with φ=0
(coefficients only) and peft LoRA of rank p. Memory: on CUDA the peak allocated during a step
above what was live before; everywhere the bytes autograd saved for backward during the step
(unique storages packed by ``saved_tensors_hooks``, parameters and buffers excluded), which is
the activation memory a method adds and the only memory figure measured on CPU.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..continual import AdapterStats, ContinualLearner, ShareConfig, ShareMethod
from . import model as perf
from .common import peak_memory_bytes, rotating, time_ms

NAME = "share"

#: (hidden, intermediate, blocks, block kind) from the models' configs
MODELS = {
    "MiniLM-L6": (384, 1536, 6, "bert"),
    "RoBERTa-base": (768, 3072, 12, "bert"),
    "Llama-2-7B": (4096, 11008, 32, "llama"),
}
TASKS = (10, 100, 500)


def model_shapes(hidden: int, inter: int, blocks: int, kind: str) -> list[tuple[int, int]]:
    """(d_in, d_out) of every adapted linear: BERT q, k, v, attention out, intermediate, output;
    Llama q, k, v, o, gate, up, down."""
    attn = [(hidden, hidden)] * 4
    mlp = [(hidden, inter), (inter, hidden)] if kind == "bert" else [(hidden, inter), (hidden, inter), (inter, hidden)]
    return (attn + mlp) * blocks


def param_rows(config: ShareConfig) -> list[dict]:
    rows = []
    for name, spec in MODELS.items():
        shapes = model_shapes(*spec)
        st = AdapterStats.from_shapes(ShareMethod, shapes, config, lora_rank=config.r, bytes_per_param=4)
        for r in st.rows(TASKS):
            rows.append(
                {
                    "case": f"params {name} T={r['tasks']}",
                    "layers": st.layers,
                    "share trainable/task": st.trainable_per_task,
                    "lora trainable/task": st.lora_per_task,
                    "trainable_ratio": st.trainable_ratio,
                    "share KB/task": r["share_kb_per_task"],
                    "lora KB/task": r["lora_kb_per_task"],
                    "stored/task ratio": st.stored_ratio,
                    "share total MB": r["share_total_mb"],
                    "lora total MB": r["lora_total_mb"],
                    "total_ratio": r["total_ratio"],
                }
            )
    return rows


def _mlp(d: int, h: int, dtype, device) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to(device=device, dtype=dtype)


def _share_block(base: nn.Module, r: int, phi: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A Share-wrapped copy of ``base`` in its steady state: first task consolidated, second
    task in training."""
    model = copy.deepcopy(base)
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=32, p=r, r=r, phi=phi)
    learner.begin_task("first")
    learner.end_task("first")
    learner.begin_task("second")
    return model, learner.trainable_parameters()


def _peft_block(base: nn.Module, r: int):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    model = copy.deepcopy(base)
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["0", "2"])
    model = inject_adapter_in_model(config, model).to(dtype=next(base.parameters()).dtype)
    return model, [p for p in model.parameters() if p.requires_grad]


def saved_activation_bytes(step, model: nn.Module) -> int:
    """Bytes of the unique storages autograd saves for backward during ``step()``, excluding the
    model's parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _train_step(model: nn.Module, params: list[nn.Parameter]):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x):
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_rows(device: torch.device, preset: str, echo=print) -> list[dict]:
    if preset == "quick":
        d, h, tokens, dtype, r = 64, 256, 32, torch.float32, 8
    elif device.type == "cpu":
        d, h, tokens, dtype, r = 1024, 4096, 512, torch.float32, 8
    else:
        d, h, tokens, dtype, r = 4096, 11008, 4096, torch.bfloat16, 8
    budget = 0.3 if preset == "quick" else 1.0
    base = _mlp(d, h, dtype, device)
    xs = [torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    variants = {
        f"share p={r} phi=2": _share_block(base, r, phi=2),
        f"share p={r} phi=0": _share_block(base, r, phi=0),
        f"peft lora r={r}": _peft_block(base, r),
    }
    rows, peft_ms, peft_saved = [], None, None
    for name, built in reversed(list(variants.items())):  # peft first: the others' ratios need it
        if built is None:
            echo(f"  {name}: peft not installed, skipped")
            continue
        model, params = built
        step = _train_step(model, params)
        ms = time_ms(rotating(step, [(x,) for x in xs]), device, budget_s=budget)
        saved = saved_activation_bytes(lambda: step(xs[0]), model)
        peak = peak_memory_bytes(lambda: step(xs[0]), device)
        if name.startswith("peft"):
            peft_ms, peft_saved = ms, saved
        width = r if name.startswith("peft") else 32 + (2 if "phi=2" in name else 0)
        elt = perf.elt_size(dtype)  # model: both adapted linears' forward + backward, GELU ignored
        cost = perf.lowrank_linear_train(tokens, d, h, width, elt) + perf.lowrank_linear_train(tokens, h, d, width, elt)
        rows.append(
            {
                "case": f"train_step {name}",
                "shape": f"{tokens}x{d}->{h}->{d}",
                "dtype": str(dtype).replace("torch.", ""),
                "trainable": sum(p.numel() for p in params),
                "ms": ms,
                "vs peft": ms / peft_ms if peft_ms else float("nan"),
                "saved MB": saved / 1e6,
                "saved vs peft": saved / peft_saved if peft_saved else float("nan"),
                "peak MB": peak / 1e6 if peak is not None else float("nan"),
                **perf.columns(cost, ms, device),
            }
        )
        echo(f"  {rows[-1]['case']}: {ms:.3g} ms")
    return rows[::-1]


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    return param_rows(ShareConfig()) + train_rows(device, preset, echo)
