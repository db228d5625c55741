"""share_kernels.integrations: the Trainer over a stream of tasks, generate with a task per row."""
import copy
import os

import pytest
import torch
import transformers

import share_kernels as sk
from share_kernels.continual import adapter_layers
from share_kernels.integrations import ContinualTrainer, expand_task_names, generate_with_tasks

transformers.logging.set_verbosity_error()

METHODS = {"share": dict(k=4, p=2, r=4, phi=2), "inflora": dict(r=2), "pslora": dict(r=2, lam=1.0)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randint(0, 60, (n, 9), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


class RecordOptimizer(transformers.TrainerCallback):
    def __init__(self):
        self.params = []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.params.append({id(p) for g in optimizer.param_groups for p in g["params"]})


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_over_three_tasks(method, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg)
    learner = sk.ContinualLearner(model, method, ["query", "value"], **METHODS[method])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=2e-2,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    rec = RecordOptimizer()
    trainer = ContinualTrainer(args=args, learner=learner, save_dir=tmp_path / "adapters", callbacks=[rec])
    expected_params = []
    orig_train = trainer.train

    def train(**kw):  # the trainable parameters right before train(): the optimizer must hold exactly these
        expected_params.append({id(p) for p in learner.trainable_parameters()})
        out = orig_train(**kw)
        if method == "pslora" and learner.current_task != "t0":  # trained: B != 0, a history to oppose
            # extra_loss is in the training loss: compute_loss = the model's loss + the stability loss
            batch = trainer._boundary_batches(Rows(4, 9))[0]
            model.train()
            with torch.no_grad():
                got = trainer.compute_loss(model, batch)
                want = model(**batch).loss + learner.extra_loss()
            assert learner.extra_loss() > 0 and torch.allclose(got, want)
        return out

    trainer.train = train
    results = trainer.train_tasks([("t0", Rows(12, 0)), ("t1", Rows(12, 1)), ("t2", Rows(12, 2))])
    assert [r["task"] for r in results] == ["t0", "t1", "t2"] and learner.tasks == ["t0", "t1", "t2"]
    assert rec.params == expected_params and all(rec.params)
    assert len({frozenset(p) for p in rec.params}) == 3  # a new optimizer per task, on new parameters
    # the adapters saved after the last task load into a fresh copy and give the same outputs
    fresh = transformers.BertForSequenceClassification(cfg)
    fresh.load_state_dict(sk.base_state_dict(model))  # the base weights and the trained head, plain names
    assert sk.load_adapters(fresh, tmp_path / "adapters") == ["t0", "t1", "t2"]
    x = Rows(4, 5).x
    model.eval()
    fresh.eval()
    for t in ("t0", "t2"):
        learner.set_task(t)
        for layer in adapter_layers(fresh).values():
            layer.set_task(t)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, fresh(input_ids=x).logits, atol=1e-5)


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def gpt2_two_tasks():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=48, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    learner = sk.ContinualLearner(model, "share", "all-linear", k=4, p=2, r=4, phi=2)
    for seed, t in enumerate(["a", "b"]):
        ids = torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(seed))
        learner.begin_task(t)
        opt = torch.optim.SGD(learner.trainable_parameters(), lr=1.0)
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        learner.end_task(t)
    learner.set_task(None)
    return model, learner


CASES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=1, num_return_sequences=2),  # sampling path, a peaked distribution
    "beam": dict(num_beams=3, do_sample=False),
    "beam-2-returned": dict(num_beams=3, num_return_sequences=2, do_sample=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_with_a_task_per_row(gpt2_two_tasks, case):
    model, learner = gpt2_two_tasks
    kw = dict(max_new_tokens=6, use_cache=True, pad_token_id=0, **CASES[case])
    prompts = torch.randint(1, 50, (3, 5), generator=torch.Generator().manual_seed(7))
    tasks = ["b", "__base__", "a"]
    torch.manual_seed(0)
    mixed = generate_with_tasks(model, tasks, prompts, **kw)
    per_row = mixed.shape[0] // len(tasks)
    outs = set()
    for i, t in enumerate(tasks):
        learner.set_task(None if t == "__base__" else t)
        with torch.no_grad():
            alone = model.generate(prompts[i : i + 1], **kw)
        assert torch.equal(mixed[i * per_row : (i + 1) * per_row], alone), (case, t)
        outs.add(tuple(alone[0].tolist()))
    learner.set_task(None)
    assert len(outs) == 3  # the tasks really differ


def test_expand_task_names_and_errors(gpt2_two_tasks):
    assert expand_task_names(["a", "b"], num_beams=2) == ["a", "a", "b", "b"]
    assert expand_task_names(["a", "b"], num_return_sequences=3) == ["a"] * 3 + ["b"] * 3
    assert expand_task_names(["a"], num_beams=2, num_return_sequences=2) == ["a", "a"]
    with pytest.raises(ValueError, match="num_beams"):
        expand_task_names(["a"], num_beams=0)
    model, _ = gpt2_two_tasks
    with pytest.raises(ValueError, match="one task name per row"):
        generate_with_tasks(model, ["a"], torch.ones(2, 3, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="unknown task"):
        generate_with_tasks(model, ["a", "nosuch"], torch.ones(2, 3, dtype=torch.long), max_new_tokens=1)


# ----------------------------------------------------------------------------- 2 processes (gloo)


@pytest.mark.parametrize("method", ["inflora"])
def test_trainer_two_processes_identical_adapters(method, tmp_path):
    """torchrun --nproc_per_node 2 (CPU, gloo): both processes end with identical adapters.
    InfLoRA: its task boundary reads data, the case where ranks could drift apart."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from share_kernels.continual.io import saved_files

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "tests", "trainer_ddp_script.py"), str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "of 2: done" in proc.stdout
    saved = {d: saved_files(tmp_path / d) for d in ("rank0", "rank1", "main")}
    files = sorted(saved["rank0"])
    assert len(files) == 4  # shared + three tasks
    assert files == sorted(saved["rank1"]) == sorted(saved["main"])
    for f in files:  # rank 0, rank 1, and what the trainer saved (main process) agree exactly
        a, b, c = (load_file(saved[d][f]) for d in ("rank0", "rank1", "main"))
        assert a.keys() == b.keys() == c.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), (f, k)
    trained = load_file(saved["rank0"]["task-t2.safetensors"])
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith(".A"))  # A trained away from zero


def test_extra_loss_counts_once_per_step_under_gradient_accumulation(tmp_path):
    """When Trainer leaves the loss undivided by the accumulation steps (the model normalised it
    over the accumulated batch: model_accepts_loss_kwargs and num_items_in_batch given),
    compute_loss adds extra_loss / G per micro-batch, so the regulariser counts once per step;
    otherwise Trainer divides the whole loss and extra_loss is added as it is."""
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg)
    learner = sk.ContinualLearner(model, "pslora", ["query", "value"], **METHODS["pslora"])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to=[],
        logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_accumulation_steps=4,
    )
    trainer = ContinualTrainer(args=args, learner=learner, save_dir=tmp_path / "adapters")
    learner.begin_task("t0")
    learner.extra_loss = lambda: torch.tensor(8.0)
    trainer.current_gradient_accumulation_steps = 4
    trainer.loss_is_scaled_for_ga = None
    trainer.compute_loss_func = None
    batch = trainer._boundary_batches(Rows(4, 9))[0]
    model.train()
    with torch.no_grad():
        base = model(**batch).loss
        trainer.model_accepts_loss_kwargs = True
        scaled = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(16))
        trainer.model_accepts_loss_kwargs = False
        plain = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(16))
    assert torch.allclose(scaled - base, torch.tensor(2.0)) and torch.allclose(plain - base, torch.tensor(8.0))
