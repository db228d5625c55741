"""Share, InfLoRA and PS-LoRA against HF peft's LoRA on a MiniLM-sized transformer, as a user
would run them: one process, the variants timed in alternation (A/B), medians.

Model: ``transformers.BertModel`` from a ``BertConfig`` (hidden 384, 6 layers, 12 heads,
intermediate 1536: MiniLM-L6's shapes, random weights, dropout 0, no pooler), every
``query``, ``key``, ``value`` and ``dense`` linear adapted (36 layers) by every method, rank
``R = 8``: peft ``LoraConfig(r=8, lora_alpha=8, lora_dropout=0)``; Share ``p = 8`` with ``k = 8``
(the same low-rank width as the LoRA) and with its default ``k = 32``; InfLoRA ``r = 8`` with
``fold=True`` (finished tasks merged into the weight, as a long run would); PS-LoRA ``r = 8``.

Rows (inputs: random token ids; the loss the mean square of the last hidden state):

* ``train``: forward + backward + AdamW step of the task in training, in each method's steady
  state (Share: a later task, coefficients plus φ = 2 temporary directions; InfLoRA: a later
  task's A; PS-LoRA: a later task's LoRA plus the stability loss a user adds, and the same
  step without the loss) against peft's LoRA step; ``train fused-AdamW`` the same with
  ``AdamW(fused=True)`` for every variant (torch's default AdamW steps the parameter tensors
  one by one on a CPU, which charges Share's 6 tensors per layer against peft's 2);
  ``train big-batch`` the default-AdamW step at 16 x 128 tokens (8x the tokens: the work that
  is per step, not per token, weighs 8x less);
* ``infer``: a forward under ``torch.inference_mode()`` with one finished task selected against
  peft's forward with its adapter active (also Share k=32 with ``set_merged_inference``: one
  ``F.linear`` on a cached ``W + dW``);
* ``mixed T``: a batch whose sequences belong to T tasks (ids cycle over the tasks), Share's
  ``task_ids`` forward against peft's ``adapter_names`` forward with T adapters loaded.

``vs peft`` is the median over rounds of (variant time / peft time in the same round): each
round times every variant once, in an order rotated per round, so load on a shared machine
falls on all of them alike. Beside each row, the performance model of
:mod:`share_kernels.bench.model` (FLOPs, bytes, the H100 / H200 bound).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from ..continual import ContinualLearner, task_ids
from ..nn import ShareLinear, set_merged_inference
from . import model as perf
from .common import sync

NAME = "vs_peft"

TARGETS = ["query", "key", "value", "dense"]
R = 8


def _bert(preset: str, device, dtype) -> nn.Module:
    from transformers import BertConfig, BertModel

    if preset == "quick":
        cfg = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    else:
        cfg = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    config = BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).to(device=device, dtype=dtype).eval()


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state.float().square().mean()


def _train_fn(model: nn.Module, params, ids, extra: Callable[[], torch.Tensor] | None = None, fused: bool = False):
    # fused=False: torch's default AdamW (on a CPU one parameter tensor at a time, ~30 µs each)
    opt = torch.optim.AdamW(list(params), lr=1e-4, **({"fused": True} if fused else {}))

    def step():
        loss = _loss(model, ids)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer_fn(model: nn.Module, ids, **kw):
    def fwd():
        with torch.inference_mode():
            return model(input_ids=ids, **kw).last_hidden_state

    return fwd


def _randomize(params, std: float = 0.02) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std)


# ----------------------------------------------------------------------------- the variants


def _peft(base: nn.Module, n_adapters: int = 1):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="t0")
    for i in range(1, n_adapters):
        model.add_adapter(f"t{i}", config)
    _randomize(p for n, p in model.named_parameters() if "lora_B" in n)  # B = 0 at init
    return model


def _share(base: nn.Module, k: int, n_tasks: int = 0):
    """Share in its steady state: task t0 trained as LoRA and consolidated, task t1 in training
    (coefficients + φ = 2 temporary directions); with ``n_tasks``, t1 ended and tasks up to
    ``n_tasks`` added with random coefficients."""
    model = copy.deepcopy(base)
    learner = ContinualLearner(model, "share", target_modules=TARGETS, k=k, p=R, r=R, phi=2)
    learner.begin_task("t0")
    _randomize(learner.trainable_parameters())
    learner.end_task("t0")
    learner.begin_task("t1")
    if n_tasks:
        _randomize(learner.trainable_parameters())
        learner.end_task("t1")
        layers = [m for m in model.modules() if isinstance(m, ShareLinear)]
        for i in range(2, n_tasks):
            for layer in layers:
                layer.add_task(f"t{i}")
        _randomize(p for layer in layers for p in [*layer.eps_a.values(), *layer.eps_b.values()])
    return model, learner


def _inflora(base: nn.Module, ids: torch.Tensor):
    model = copy.deepcopy(base)
    learner = ContinualLearner(model, "inflora", target_modules=TARGETS, r=R, fold=True, total_tasks=10)
    batches = [{"input_ids": ids}]
    for t in ("t0", "t1"):
        learner.begin_task(t, batches)
        _randomize(learner.trainable_parameters())
        learner.end_task(t, batches)
    learner.begin_task("t2", batches)
    _randomize(learner.trainable_parameters())
    return model, learner, batches


def _pslora(base: nn.Module):
    model = copy.deepcopy(base)
    learner = ContinualLearner(model, "pslora", target_modules=TARGETS, r=R, lora_alpha=float(R))
    learner.begin_task("t0")
    _randomize(learner.trainable_parameters())
    learner.end_task("t0")
    learner.begin_task("t1")
    _randomize(learner.trainable_parameters())
    return model, learner


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``rounds`` rounds (after one warm-up round), each round
    calling every fn once in an order rotated by one per round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            if r:
                times[n].append(time.perf_counter() - t0)
    return times


def _rows(case: str, times: dict[str, list[float]], baseline: str, shape: str, models: dict, device) -> list[dict]:
    rows = []
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[baseline]))
        row = {
            "case": f"{case} {name}",
            "shape": shape,
            "rounds": len(ts),
            "ms": statistics.median(ts) * 1e3,
            "vs peft": ratio,
        }
        row.update(perf.columns(models[name], statistics.median(ts) * 1e3, device))
        rows.append(row)
    return rows


def run(device: torch.device, preset: str = "full", echo=print) -> list[dict]:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        echo(f"  skipped: {e} (pip install peft transformers)")
        return [{"case": "skipped", "note": f"needs peft and transformers: {e}"}]
    quick = preset == "quick"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rounds = 3 if quick else 15
    base = _bert(preset, device, dtype)
    cfg = base.config
    vocab = cfg.vocab_size
    batch, seq = (2, 8) if quick else (4, 64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    shape = dict(
        hidden=cfg.hidden_size, inter=cfg.intermediate_size, layers=cfg.num_hidden_layers, elt=perf.elt_size(dtype)
    )
    ks = {"share k=8": 8, "share k=32": 32}
    rows: list[dict] = []

    # ---- training step and single-task inference
    peft_model = _peft(base)
    shares = {n: _share(base, k) for n, k in ks.items()}
    inf_model, inf_learner, _ = _inflora(base, ids)
    ps_model, ps_learner = _pslora(base)
    def train_fns(fused: bool, ids=ids) -> dict[str, Callable[[], None]]:
        peft_params = [p for p in peft_model.parameters() if p.requires_grad]
        fns = {"peft lora": _train_fn(peft_model.train(), peft_params, ids, fused=fused)}
        for n, (m, lr) in shares.items():
            fns[n] = _train_fn(m.train(), lr.trainable_parameters(), ids, fused=fused)
        fns["inflora"] = _train_fn(inf_model.train(), inf_learner.trainable_parameters(), ids, fused=fused)
        ps_params = ps_learner.trainable_parameters()
        fns["pslora"] = _train_fn(ps_model.train(), ps_params, ids, ps_learner.extra_loss, fused=fused)
        # the same step without the stability loss: what the layer costs, apart from the method's loss
        fns["pslora no loss"] = _train_fn(ps_model, ps_params, ids, fused=fused)
        return fns

    tokens = batch * seq
    models = {"peft lora": perf.bert_model("lora", tokens, seq, R, train=True, **shape)}
    for n, k in ks.items():
        # the forward runs at rank min(p, k + φ) (ShareLinear._single_operands)
        models[n] = perf.bert_model("share", tokens, seq, min(R, k + 2), train=True, **shape)
    models["inflora"] = perf.bert_model("lora", tokens, seq, R, train=True, **shape)
    models["pslora"] = perf.bert_model("pslora", tokens, seq, R, train=True, **shape)
    models["pslora no loss"] = perf.bert_model("lora", tokens, seq, R, train=True, **shape)
    # Two optimizers, the same for every variant: torch's default AdamW, which on a CPU steps
    # each parameter tensor in turn (Share's training task has 6 per layer, peft's LoRA 2), and
    # AdamW(fused=True), one kernel over all of them.
    for case, fused in (("train", False), ("train fused-AdamW", True)):
        times = alternate(train_fns(fused), rounds, device)
        n0 = len(rows)
        rows += _rows(case, times, "peft lora", f"{batch}x{seq}", models, device)
        echo(f"  {case}: " + ", ".join(f"{r['case'][len(case) + 1:]} {r['vs peft']:.3g}x" for r in rows[n0:]))

    # A step of 8x as many tokens (default AdamW): what scales with the tokens grows 8x, what does
    # not (the optimizer over the adapter tensors, PS-LoRA's stability loss over every weight
    # element, Share's factor rebuild) stays, so the ratios show how much of the gap is per step.
    big_batch, big_seq = (2, 16) if quick else (16, 128)
    ids_big = torch.randint(0, vocab, (big_batch, big_seq), generator=gen).to(device)
    big_models = {
        n: perf.bert_model(
            "pslora" if n == "pslora" else "share" if n.startswith("share") else "lora",
            big_batch * big_seq, big_seq, min(R, ks[n] + 2) if n in ks else R, train=True, **shape,
        )
        for n in models
    }
    times = alternate(train_fns(False, ids_big), 3 if quick else 5, device)
    n0 = len(rows)
    rows += _rows("train big-batch", times, "peft lora", f"{big_batch}x{big_seq}", big_models, device)
    echo("  train big-batch: " + ", ".join(f"{r['case'][16:]} {r['vs peft']:.3g}x" for r in rows[n0:]))

    # finish every task in training; the forward then serves one finished task
    for n, (m, lr) in shares.items():
        lr.end_task("t1")
        lr.set_task("t1")
    inf_learner.end_task("t2", [{"input_ids": ids}])
    inf_learner.set_task("t2")
    ps_learner.end_task("t1")
    ps_learner.set_task("t1")
    infer = {"peft lora": _infer_fn(peft_model.eval(), ids)}
    for n, (m, _) in shares.items():
        infer[n] = _infer_fn(m.eval(), ids)
    merged = copy.deepcopy(shares["share k=32"][0])
    set_merged_inference(merged)
    infer["share k=32 merged"] = _infer_fn(merged, ids)
    infer["inflora"] = _infer_fn(inf_model.eval(), ids)
    infer["pslora"] = _infer_fn(ps_model.eval(), ids)
    models = {"peft lora": perf.bert_model("lora", tokens, seq, R, **shape)}
    for n, k in ks.items():
        models[n] = perf.bert_model("share", tokens, seq, min(R, k), **shape)
    models["share k=32 merged"] = perf.bert_model("dense", tokens, seq, 0, **shape)  # cached W + dW
    models["inflora"] = perf.bert_model("dense", tokens, seq, 0, **shape)  # all folded: W + delta
    models["pslora"] = perf.bert_model("dense", tokens, seq, 0, **shape)  # finished: merged weight
    times = alternate(infer, rounds, device)
    n0 = len(rows)
    rows += _rows("infer", times, "peft lora", f"{batch}x{seq}", models, device)
    echo(f"  infer: " + ", ".join(f"{r['case'].split(' ', 1)[1]} {r['vs peft']:.3g}x" for r in rows[n0:]))
    del peft_model, shares, merged, inf_model, ps_model, infer

    # ---- mixed batches: sequences of T tasks in one forward
    mixed_tasks = (4,) if quick else (8, 64, 256)
    for T in mixed_tasks:
        n_seq = max(T, 64) if not quick else 4
        seq_m = max(1024 // n_seq, 1) if not quick else 4
        ids_m = torch.randint(0, vocab, (n_seq, seq_m), generator=gen).to(device)
        names = [f"t{i % T}" for i in range(n_seq)]
        peft_m = _peft(base, T).eval()
        fns = {"peft lora": _infer_fn(peft_m, ids_m, adapter_names=names)}
        models = {"peft lora": perf.bert_model("lora", n_seq * seq_m, seq_m, R, **shape)}
        kept = []
        for n, k in ks.items():
            m, _ = _share(base, k, n_tasks=T)
            m.eval()
            kept.append(m)

            def fwd(m=m):
                with torch.inference_mode(), task_ids(m, names):
                    return m(input_ids=ids_m).last_hidden_state

            fns[n] = fwd
            models[n] = perf.bert_model("share", n_seq * seq_m, seq_m, k, **shape)
        times = alternate(fns, max(rounds // 2, 3) if T >= 64 else rounds, device)
        n0 = len(rows)
        rows += _rows(f"mixed T={T}", times, "peft lora", f"{n_seq}x{seq_m}", models, device)
        echo(f"  mixed T={T}: " + ", ".join(f"{r['case'].split(' ', 2)[2]} {r['vs peft']:.3g}x" for r in rows[n0:]))
        del peft_m, kept, fns
    return rows
