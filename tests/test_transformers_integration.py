"""The Hugging Face stack: autocast, GPT-2 Conv1D targets, merge / unload, path-like arguments.

Tiny models built from configs (no downloads); every method trains two tasks."""
import copy
import pathlib
import warnings

import peft
import pytest
import torch
import transformers

import share_kernels as sk
from share_kernels.continual import ContinualLearner, adapter_layers, match_linear_layers
from share_kernels.nn.common import is_conv1d

transformers.logging.set_verbosity_error()

METHODS = {
    "share": dict(k=4, p=2, r=4, phi=2),
    "inflora": dict(r=2),
    "pslora": dict(r=2, lora_alpha=4.0),
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert_step(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def gpt2_step(model, ids, labels=None):
    return model(input_ids=ids, labels=ids).loss


def train_tasks(model, method, targets, step, ids, labels=None, tasks=("a", "b"), autocast=None, steps=2, lr=0.05):
    """Train ``tasks`` in turn; under ``autocast`` (a dtype) the forward runs in a CPU autocast region.
    Checks every trainable parameter gets a finite gradient in its own dtype."""
    learner = ContinualLearner(model, method, targets, **METHODS[method])
    batches = [{"input_ids": ids}]
    for t in tasks:
        learner.begin_task(t, batches)
        params = learner.trainable_parameters()
        opt = torch.optim.SGD(params, lr=lr)
        for _ in range(steps):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = step(model, ids, labels) + learner.extra_loss()
            loss.backward()
            for p in params:
                assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
            assert any(p.grad.abs().sum() > 0 for p in params)
            opt.step()
            opt.zero_grad()
        learner.end_task(t, batches)
    return learner


def hidden(model, ids, autocast=None):
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-1]


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_autocast_training_and_accuracy_bert(method, dtype):
    torch.manual_seed(0)
    model = tiny_bert()
    ids, labels = torch.randint(0, 60, (4, 9)), torch.randint(0, 3, (4,))
    learner = train_tasks(model, method, ["query", "value", "dense"], bert_step, ids, labels, autocast=dtype)
    learner.set_task("b")
    # Low-precision rule: the autocast output's error against float64 is within 2x (plus a
    # hair) of plain PyTorch's autocast error, plain PyTorch being the same model merged.
    ref = hidden(copy.deepcopy(model).double(), ids)
    ours = hidden(model, ids, dtype)
    plain = sk.merge_and_unload(copy.deepcopy(model), "b")
    err_plain = rel(hidden(plain, ids, dtype), ref)
    assert 0 < rel(ours, ref) <= 2 * err_plain + 1e-4, (rel(ours, ref), err_plain)
    assert rel(hidden(model, ids), ref) < 1e-5  # fp32 outside the region


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_follow_autocast_like_linear(dtype):
    x, w, b = torch.randn(5, 7), torch.randn(6, 7), torch.randn(6)
    U, C = torch.randn(7, 3, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = sk.lowrank_linear(x, w, b, U, C)
        assert y.dtype == torch.nn.functional.linear(x, w, b).dtype == dtype
    y.float().sum().backward()
    assert U.grad.dtype == C.grad.dtype == torch.float32
    ref = sk.lowrank_linear_reference(x.double(), w.double(), b.double(), U.double(), C.double())
    low = torch.nn.functional.linear(x.to(dtype), w.to(dtype), b.to(dtype))  # F.linear in the low dtype
    plain = low.double() + (x.double() @ U.double()) @ C.double()
    assert rel(y, ref) <= 2 * rel(plain, ref) + 2 * torch.finfo(dtype).eps
    cores, V = torch.randn(2, 3, 3), torch.randn(6, 3)
    ids = torch.tensor([0, -1, 1, 0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        m = sk.multi_task_linear(x, w, b, U.detach(), cores, V, ids)
        base = torch.nn.functional.linear(x, w, b)
    assert m.dtype == dtype
    assert torch.equal(m[1], base[1])  # id -1: bit-identical to F.linear under the same autocast
    # the stability loss is a loss: fp32 under autocast, whatever the inputs
    A, B, P = torch.randn(2, 7, dtype=dtype), torch.randn(6, 2), torch.randn(6, 7)
    with torch.autocast("cpu", dtype=dtype):
        loss = sk.stability_loss(A, B, P, 2.0)
    assert loss.dtype == torch.float32
    assert rel(loss, sk.stability_loss_reference(A.double(), B.double(), P.double(), 2.0)[0]) < 1e-5


def test_autocast_rules_registered_for_cpu_and_cuda():
    sk.project_complement(torch.randn(4, 3), torch.linalg.qr(torch.randn(4, 2)).Q)  # registers its ops
    for op in ("lowrank_linear", "multi_task_linear", "stability_loss", "stability_loss_and_grad",
               "project_complement", "project_complement_grouped"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"share_kernels::{op}", key), (op, key)
    X, M = torch.randn(6, 5, dtype=torch.bfloat16), torch.linalg.qr(torch.randn(6, 2)).Q
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 rule: a projection keeps fp32
        out = torch.ops.share_kernels.project_complement(X, M, "remove")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, X.float() - M @ (M.t() @ X.float()))


def test_compile_under_autocast():
    x, w, b = torch.randn(5, 7), torch.randn(6, 7), torch.randn(6)
    U, C = torch.randn(7, 3, requires_grad=True), torch.randn(3, 6, requires_grad=True)

    def f(x, w, b, U, C):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sk.lowrank_linear(x, w, b, U, C)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, U, C)
    assert y.dtype == torch.bfloat16 and torch.equal(y, f(x, w, b, U, C))
    y.float().sum().backward()
    assert U.grad.dtype == C.grad.dtype == torch.float32


def test_autocast_mixed_task_batch_share():
    torch.manual_seed(0)
    model = tiny_bert()
    ids, labels = torch.randint(0, 60, (4, 9)), torch.randint(0, 3, (4,))
    train_tasks(model, "share", ["query", "value"], bert_step, ids, labels, autocast=torch.bfloat16)
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), sk.task_ids(model, names):
        mixed = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ref = copy.deepcopy(model).double()
    for i, t in enumerate(names):
        for layer in adapter_layers(ref).values():
            layer.set_task(None if t == "__base__" else t)
        want = hidden(ref, ids[i : i + 1])
        # plain PyTorch under the same autocast: the task merged into nn.Linear (the base model for -1)
        plain = sk.unload(copy.deepcopy(model)) if t == "__base__" else sk.merge_and_unload(copy.deepcopy(model), t)
        err_plain = rel(hidden(plain, ids[i : i + 1], torch.bfloat16), want)
        assert rel(mixed[i : i + 1], want) <= 2 * err_plain + 1e-4, (t, rel(mixed[i : i + 1], want), err_plain)


@pytest.mark.parametrize("method", list(METHODS))
def test_model_cast_to_bf16_trains(method):
    torch.manual_seed(0)
    model = tiny_bert()
    ids, labels = torch.randint(0, 60, (4, 9)), torch.randint(0, 3, (4,))
    learner = ContinualLearner(model, method, ["query", "value"], **METHODS[method])
    model.to(torch.bfloat16)
    for t in ("a", "b"):
        learner.begin_task(t, [{"input_ids": ids}])
        params = learner.trainable_parameters()
        assert params and all(p.dtype == torch.bfloat16 for p in params)
        loss = bert_step(model, ids, labels) + learner.extra_loss()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)
        torch.optim.SGD(params, lr=0.05).step()
        learner.end_task(t, [{"input_ids": ids}])
    learner.set_task("b")
    assert torch.isfinite(model(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------- GPT-2 (Conv1D)


def test_all_linear_picks_conv1d_like_peft():
    model = tiny_gpt2()
    ours = match_linear_layers(model, "all-linear")
    assert len(ours) == 8 and all(is_conv1d(model.get_submodule(n)) for n in ours)
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A"))
    assert sorted(ours) == theirs


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_train_save_load_merge(method, tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    ids = torch.randint(0, 50, (3, 10))
    learner = train_tasks(model, method, "all-linear", gpt2_step, ids, lr=0.2)
    layer = next(iter(adapter_layers(model).values()))
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 48)
    outs = {}
    for t in ("a", "b"):
        learner.set_task(t)
        outs[t] = hidden(model, ids)
    # a reference forward by hand: the Conv1D weight (d_in, d_out) plus the task's update
    learner.set_task("a")
    assert not torch.equal(outs["a"], hidden(base, ids))
    sk.save_adapters(model, pathlib.Path(tmp_path) / "ad")
    loaded = copy.deepcopy(base)
    assert sk.load_adapters(loaded, pathlib.Path(tmp_path) / "ad") == ["a", "b"]
    for t in ("a", "b"):
        for m in adapter_layers(loaded).values():
            m.set_task(t)
        assert rel(hidden(loaded, ids), outs[t]) < 1e-6

    # merge: outputs equal the unmerged task's within fp32 rounding; unmerge restores exactly
    weights = {n: m.base_layer.weight.clone() for n, m in adapter_layers(model).items()}
    for t in ("a", "b"):
        sk.merge_adapter(model, t)
        assert rel(hidden(model, ids), outs[t]) < 1e-5
        with pytest.raises(RuntimeError, match="merged"):
            learner.set_task(t)
            model(input_ids=ids)
        learner.set_task(None)
        sk.unmerge_adapter(model)
        assert all(torch.equal(m.base_layer.weight, weights[n]) for n, m in adapter_layers(model).items())
        assert rel(hidden(model, ids), outs[t]) < 1e-6
    plain = sk.merge_and_unload(copy.deepcopy(model), "b")
    assert not adapter_layers(plain) and all(is_conv1d(plain.get_submodule(n)) for n in weights)
    assert rel(hidden(plain, ids), outs["b"]) < 1e-5
    bare = sk.unload(model)
    assert not adapter_layers(bare) and torch.equal(hidden(bare, ids), hidden(base, ids))


def test_gpt2_share_mixed_batch():
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (3, 10))
    learner = train_tasks(model, "share", "all-linear", gpt2_step, ids, lr=0.2)
    names = ["b", "__base__", "a"]
    with torch.no_grad(), sk.task_ids(model, names):
        mixed = model(input_ids=ids).logits
    for i, t in enumerate(names):
        learner.set_task(None if t == "__base__" else t)
        with torch.no_grad():
            assert rel(mixed[i], model(input_ids=ids[i : i + 1]).logits[0]) < 1e-5


def test_gpt2_peft_round_trip_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    dirs, expected = {}, {}
    for seed, name in enumerate(["t0", "t1"]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "fan_in_fan_out is set to False but ... Conv1D"
            pm = peft.get_peft_model(
                copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
            )
        assert pm.peft_config["default"].fan_in_fan_out
        pm.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name  # pathlib.Path
        expected[name] = hidden(pm, ids)
    model = sk.from_peft_adapters(copy.deepcopy(base), dirs, k=8)
    for name in dirs:
        for m in adapter_layers(model).values():
            m.set_task(name)
        assert rel(hidden(model, ids), expected[name]) < 1e-5
    out = tmp_path / "exported"  # a pathlib.Path, not a str
    sk.to_peft_adapter(model, "t1", out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    assert back.peft_config["default"].fan_in_fan_out
    assert rel(hidden(back, ids), expected["t1"]) < 1e-5
    # the command line's compress, path-like arguments throughout, then loaded into GPT-2
    from share_kernels.continual.compress import compress

    compress(list(dirs.values()), 8, tmp_path / "compressed", progress=False)
    again = copy.deepcopy(base)
    assert sk.load_adapters(again, tmp_path / "compressed") == ["t0", "t1"]
    for m in adapter_layers(again).values():
        m.set_task("t0")
    assert rel(hidden(again, ids), expected["t0"]) < 1e-5


# ----------------------------------------------------------------------------- merge (nn.Linear)


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_bert_matches_each_task(method):
    torch.manual_seed(0)
    model = tiny_bert()
    ids, labels = torch.randint(0, 60, (4, 9)), torch.randint(0, 3, (4,))
    learner = train_tasks(model, method, ["query", "value"], bert_step, ids, labels, lr=0.5)
    for t in ("a", "b"):
        learner.set_task(t)
        want = hidden(model, ids)
        learner.set_task(None)
        merged = sk.merge_and_unload(copy.deepcopy(model), t)
        assert not any(isinstance(m, (sk.ShareLinear, sk.InfLoRALinear, sk.PSLoRALinear)) for m in merged.modules())
        assert rel(hidden(merged, ids), want) < 1e-5
    with pytest.raises(ValueError, match="unknown task"):
        sk.merge_adapter(model, "nosuch")
    with pytest.raises(ValueError, match="name a task"):
        sk.merge_adapter(model)  # no task active
    learner.set_task("a")
    weights = [m.base_layer.weight.clone() for m in adapter_layers(model).values()]
    sk.merge_adapter(model, safe_merge=True)  # the active task
    assert {m.merged_task for m in adapter_layers(model).values()} == {"a"}
    with pytest.raises(ValueError, match="already merged"):
        sk.merge_adapter(model, "b")
    with pytest.raises(ValueError, match="is merged, not"):
        sk.merge_and_unload(model, "b")
    sk.unmerge_adapter(model)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(adapter_layers(model).values(), weights))
    assert all(m.active_task == "a" for m in adapter_layers(model).values())
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sk.merge_adapter(model, "a", safe_merge=True)
    assert all(getattr(m, "merged_task", None) is None for m in adapter_layers(model).values())  # nothing written
