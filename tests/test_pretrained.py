"""Checkpoints of a wrapped model: state_dict names, HF Trainer checkpoints, save_pretrained /
from_pretrained (also in a fresh process), config lookup in the module tree, module-level
set_task, and what wrap freezes."""
import copy
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import share_kernels
from share_kernels.continual.io import saved_files
from share_kernels.continual import (
    AdapterStats,
    ContinualLearner,
    ShareConfig,
    adapter_stats,
    base_state_dict,
    find_config,
    from_pretrained,
    save_adapters,
    save_pretrained,
    set_task,
    wrap,
)
from share_kernels.continual.method import get_method
from share_kernels.continual.wrap import wrap_and_report

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bert_config(**kw):
    return transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def tiny_bert(cls=None):
    return (cls or transformers.BertForSequenceClassification)(bert_config()).eval()


def mlp():
    return nn.Sequential(nn.Linear(9, 14), nn.GELU(), nn.Linear(14, 5))


METHOD_CFG = {
    "share": dict(k=4, p=2, r=2, phi=1),
    "inflora": dict(r=2, total_tasks=2),
    "pslora": dict(r=2, lam=0.1),
}


def two_tasks(model, method, targets):
    """A learner that went through tasks a, b, each with random parameter values (no training loop)."""
    learner = ContinualLearner(model, method, targets, **METHOD_CFG[method])
    batches = [torch.randn(6, 9)]
    for t in ("a", "b"):
        learner.begin_task(t, batches)
        with torch.no_grad():
            for p in learner.trainable_parameters():
                p.normal_(0, 0.3)
        learner.end_task(t, batches)
    return learner


# ----------------------------------------------------------------------------- state_dict names


@pytest.mark.parametrize("method", sorted(METHOD_CFG))
def test_state_dict_keeps_the_base_names_and_round_trips(method):
    plain = mlp()
    plain_keys = list(plain.state_dict())
    model = mlp()
    model.load_state_dict(plain.state_dict())
    learner = two_tasks(model, method, ["0", "2"])
    state = model.state_dict()
    assert not any("base_layer" in k for k in state)
    base = base_state_dict(model)
    assert list(base) == [k for k in state if k in plain_keys] and set(base) == set(plain_keys)
    for k in plain_keys:
        assert torch.equal(state[k], plain.state_dict()[k]), k
    # the wrapped model's own state dict restores it (adapter tensors included, strict)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():  # base weights and adapters alike
            p.add_(1.0)
    other.load_state_dict(state)
    x = torch.randn(7, 9)
    for t in ("a", "b", None):
        learner.set_task(t)
        set_task(other, t)
        assert torch.equal(model(x), other(x)), t
    # and the base part loads into the plain class strictly
    fresh = mlp()
    fresh.load_state_dict(base_state_dict(model))
    learner.set_task(None)
    assert torch.equal(fresh(x), model(x))
    # the old spelling (base_layer.*) still loads
    legacy = {k.replace("0.weight", "0.base_layer.weight"): v for k, v in state.items()}
    other.load_state_dict(legacy)


# ----------------------------------------------------------------------------- HF Trainer


class Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=7):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 40, (n, seq), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_trainer_checkpoint_reloads_plainly_as_base_and_through_share_kernels_in_a_fresh_process(tmp_path):
    model = tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    learner = ContinualLearner(
        model, "share", ["query", "value"], keep_trainable=["classifier"], k=4, p=2, r=2, phi=1
    )
    assert learner.frozen.kept == ("classifier.weight", "classifier.bias") and learner.frozen.outside == ()
    learner.begin_task("t1")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    trainer.train()
    model.eval()
    q0 = model.bert.encoder.layer[0].attention.self.query
    assert q0.lora_B.abs().sum() > 0  # the task trained
    assert not torch.equal(model.classifier.weight, original["classifier.weight"])  # and the kept head
    trainer.save_model(str(tmp_path / "trainer"))

    # The plain way: the true base weights, nothing missing (re-initialised); adapters reported unused.
    plain, info = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "trainer"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(
        (".query." in k or ".value." in k) and not k.endswith((".weight", ".bias")) for k in info["unexpected_keys"]
    )
    trained = model.state_dict()
    for k, v in plain.state_dict().items():
        want = trained[k] if k.startswith("classifier.") else original[k]
        assert torch.equal(v, want), k
    ids = Data().ids[:5]
    learner.set_task(None)
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids).logits, model(ids).logits)

    # share_kernels' own round trip, after the task boundary
    learner.end_task("t1")
    out = tmp_path / "ckpt"
    save_pretrained(model, out)
    assert {"config.json", "model.safetensors", "share_config.json", "share_base.json"} <= set(os.listdir(out))
    assert set(saved_files(out)) == {"shared.safetensors", "task-t1.safetensors"}  # the adapters' manifest
    set_task(model, "t1")
    with torch.no_grad():
        want = model(ids).logits
    assert not torch.equal(want, plain(ids).logits)
    # the base folder has no adapter tensors: the plain load is clean
    _, info = transformers.BertForSequenceClassification.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    # into an instance, in this process
    loaded = from_pretrained(tiny_bert(), out)
    set_task(loaded, "t1")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    # the base by name or path (here an untrained copy), the saved base weights and adapters on top
    tiny_bert().save_pretrained(str(tmp_path / "other_base"))
    loaded = from_pretrained(str(tmp_path / "other_base"), out).eval()
    set_task(loaded, "t1")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    # by path, in a fresh process
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    code = f"""
import torch, share_kernels
from safetensors.torch import load_file, save_file
torch.set_num_threads({torch.get_num_threads()})
model = share_kernels.from_pretrained({str(out)!r}).eval()
share_kernels.set_task(model, "t1")
with torch.no_grad():
    logits = model(load_file({str(tmp_path / 'ids.safetensors')!r})["ids"]).logits
save_file({{"logits": logits}}, {str(tmp_path / 'got.safetensors')!r})
"""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "got.safetensors"))["logits"], want)


# ----------------------------------------------------------------------------- save_pretrained / from_pretrained


@pytest.mark.parametrize("method", sorted(METHOD_CFG))
def test_round_trip_of_a_plain_module_and_what_is_refused(tmp_path, method):
    model = mlp()
    learner = two_tasks(model, method, ["0", "2"])
    save_pretrained(model, tmp_path)
    ref = json.loads((tmp_path / "share_base.json").read_text())
    assert ref["base_class"] == "torch.nn.modules.container.Sequential" and ref["transformers"] is False
    x = torch.randn(5, 9)
    fresh = from_pretrained(mlp(), tmp_path)
    for t in ("a", "b", None):
        learner.set_task(t)
        set_task(fresh, t)
        assert torch.equal(fresh(x), model(x)), t
    # an already wrapped instance loads too
    again = from_pretrained(fresh, tmp_path)
    set_task(again, "b")
    learner.set_task("b")
    assert torch.equal(again(x), model(x))

    with pytest.raises(ValueError, match="not a transformers class: pass an instance"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="holds a torch.nn.modules.container.Sequential; got a .*ModuleList"):
        from_pretrained(nn.ModuleList([nn.Linear(9, 14)]), tmp_path)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['2.bias', '2.weight'\]"):
        from_pretrained(nn.Sequential(nn.Linear(9, 14), nn.GELU()), tmp_path)
    with pytest.raises(ValueError, match=r"missing \['3.bias', '3.weight'\], unexpected \[\]"):
        from_pretrained(nn.Sequential(*mlp(), nn.Linear(5, 2)), tmp_path)
    with pytest.raises(ValueError, match=r"'0.weight': expected shape \(14, 8\), got \(14, 9\)"):
        from_pretrained(nn.Sequential(nn.Linear(8, 14), nn.GELU(), nn.Linear(14, 5)), tmp_path)
    save_adapters(model, tmp_path / "adapters_only")
    with pytest.raises(ValueError, match="holds no share_base.json"):
        from_pretrained(mlp(), tmp_path / "adapters_only")
    with pytest.raises(TypeError, match="directory is required"):
        from_pretrained(mlp())


def test_sharded_base_weights_load_into_an_instance(tmp_path):
    model = tiny_bert()
    learner = ContinualLearner(model, "share", ["query", "value"], k=4, p=2, r=2)
    learner.begin_task("a")
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.normal_(0, 0.3)
    learner.end_task("a")
    save_pretrained(model, tmp_path, max_shard_size="10KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = from_pretrained(tiny_bert(), tmp_path)  # another random init: every weight must come from the files
    ids = Data().ids[:3]
    for t in ("a", None):
        set_task(loaded, t)
        learner.set_task(t)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits), t


# ----------------------------------------------------------------------------- config lookup


def test_config_is_found_where_wrap_recorded_it_or_refused():
    model = tiny_bert()
    cfg = dict(k=3, p=2, r=2, phi=0)
    wrap(model.bert, "share", ["query", "value"], **cfg)
    assert "continual_config" not in vars(model) and find_config(model) == ("bert", ShareConfig(**cfg))
    stats = adapter_stats(model)  # asked on the enclosing model, as in the issue
    layers = share_kernels.continual.adapter_layers(model)
    want = AdapterStats.from_shapes(
        get_method("share"), [(16, 16)] * 4, ShareConfig(**cfg), lora_rank=2, layers=list(layers.values())
    )
    assert stats == want == adapter_stats(model.bert)
    default = AdapterStats.from_shapes(get_method("share"), [(16, 16)] * 4, ShareConfig(), lora_rank=8)
    assert stats.trainable_per_task != default.trainable_per_task  # what the silent default used to print

    # a learner on the enclosing model writes an override back where the config was found
    learner = ContinualLearner(model, "share", phi=1)
    assert model.bert.continual_config.phi == 1 and "continual_config" not in vars(model)
    learner.begin_task("t")
    learner.end_task("t")

    with pytest.raises(ValueError, match=r"looked for \.continual_config on BertEncoder and its \d+ submodules"):
        adapter_stats(model.bert.encoder)
    model.classifier.continual_config = ShareConfig(k=5)
    with pytest.raises(ValueError, match="different method configs in its submodules.*'bert'.*'classifier'"):
        set_task(model, "t")
    model.classifier.continual_config = ShareConfig(k=3, p=2, r=2, phi=1)  # equal: fine
    set_task(model, "t")
    del model.classifier.continual_config
    model.continual_config = get_method("inflora").config_cls()
    with pytest.raises(ValueError, match="is a InfLoRAConfig .*but the adapter layers are 'share' layers"):
        adapter_stats(model)


# ----------------------------------------------------------------------------- set_task


@pytest.mark.parametrize("method", sorted(METHOD_CFG))
def test_module_level_set_task_for_every_method(method):
    base = mlp()
    model = mlp()
    model.load_state_dict(base.state_dict())
    learner = two_tasks(model, method, ["0", "2"])
    x = torch.randn(4, 9)
    with torch.no_grad():
        for t in ("a", "b"):
            learner.set_task(t)
            want = model(x)
            set_task(model, None)
            assert torch.equal(model(x), base(x))  # the base model, bit for bit
            share_kernels.set_task(model, t)
            assert torch.equal(model(x), want)
            assert not torch.equal(want, base(x))
    with pytest.raises(ValueError, match=r"unknown task 'c'; tasks are \['a', 'b'\]"):
        set_task(model, "c")
    with pytest.raises(TypeError, match="name must be a task name"):
        set_task(model, 0)
    with pytest.raises(ValueError, match="has no adapter layers"):
        set_task(mlp(), "a")


# ----------------------------------------------------------------------------- what wrap freezes


def test_wrap_says_what_it_froze(caplog):
    model = tiny_bert()
    n_params = len(list(model.parameters()))
    with caplog.at_level(logging.INFO, logger="share_kernels"), pytest.warns(UserWarning) as rec:
        wrap(model, "share", ["query", "value"], k=2, p=2)
    text = str(rec[0].message)
    assert f"wrap froze {n_params} parameter tensors" in text
    assert (
        "2 of them are outside the base model's adapted layers and will not train: classifier.weight, classifier.bias"
        in text
    )
    assert "keep_trainable" in text and any("wrap froze" in r.getMessage() for r in caplog.records)
    assert not model.classifier.weight.requires_grad

    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)  # frozen already: not counted
    n_emb = len(list(model.bert.embeddings.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = wrap_and_report(model, "share", ["query"], keep_trainable=["classifier"], k=2, p=2)
    assert report.count == n_params - n_emb - 2 and report.outside == ()
    assert report.kept == ("classifier.weight", "classifier.bias") and model.classifier.weight.requires_grad
    assert report.numel == sum(p.numel() for p in model.parameters() if not p.requires_grad) - sum(
        p.numel() for p in model.bert.embeddings.parameters()
    )

    model = tiny_bert()
    with pytest.raises(ValueError, match="keep_trainable=\\['query'\\] selects .*hold adapted layers"):
        wrap(model, "share", ["query"], keep_trainable=["query"], k=2, p=2)
    with pytest.raises(ValueError, match="hold adapted layers"):
        wrap(model, "share", ["query"], keep_trainable=["encoder"], k=2, p=2)
    assert not share_kernels.continual.adapter_layers(model)  # refused before anything changed
    model = tiny_bert()
    with pytest.raises(ValueError, match="keep_trainable=\\['head'\\] matched no submodule"):
        wrap(model, "share", ["query"], keep_trainable=["head"], k=2, p=2)
    assert not share_kernels.continual.adapter_layers(model)  # refused before anything changed
    with pytest.raises(ValueError, match="keep_trainable is applied when wrapping"):
        ContinualLearner(model, "share", keep_trainable=["classifier"])
    # a plain model whose every parameter is adapted: nothing to say beyond the log
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap(mlp(), "share", ["0", "2"], k=2, p=2)
