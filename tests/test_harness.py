"""The continual-learning harness (``share-kernels continual``): the task stream, the cached
backbone, the metrics, and a tiny configuration end to end (every registered method and the
baselines), single process and under torchrun with 2 processes."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from share_kernels.continual.method import _METHODS
from share_kernels.harness import (
    BASELINES,
    DEFAULT_TASKS,
    HarnessConfig,
    average_accuracy,
    backward_transfer,
    forgetting,
    load_task,
    load_tasks,
    run_continual,
)
from share_kernels.harness.loop import lr_at
from share_kernels.harness.run import TINY

# every registered continual method (share, and inflora / pslora once they are registered)
REGISTERED = sorted(m for m in _METHODS if m in ("share", "inflora", "pslora")) or ["share"]
# compositions of registered methods (InfLoRA with PS-LoRA's stability loss and merge)
COMPOSED = ["inflora+pslora"] if "inflora" in REGISTERED else []
TINY_METHODS = [*REGISTERED, *COMPOSED, *BASELINES]


# ------------------------------------------------------------------ data


def test_stream_splits_are_fixed_disjoint_and_balanced():
    tasks = load_tasks(DEFAULT_TASKS, train_per_class=6, test_per_class=3, seed=0)
    assert [t.name for t in tasks] == list(DEFAULT_TASKS) and len(tasks) >= 5
    all_classes = [c for t in tasks for c in t.classes]
    assert len(all_classes) == len(set(all_classes)), "class-incremental needs disjoint classes"
    for t in tasks:
        assert t.num_classes >= 3
        assert sorted(set(t.train_labels)) == list(range(t.num_classes))
        for labels, per in ((t.train_labels, 6), (t.test_labels, 3)):
            assert all(labels.count(c) == per for c in range(t.num_classes))
        assert not set(t.train_texts) & set(t.test_texts)
        assert all(t.strip() for t in t.train_texts + t.test_texts)
    again = load_task("sentiment", 6, 3, seed=0)
    assert again.train_texts == tasks[1].train_texts and again.test_texts == tasks[1].test_texts
    other = load_task("sentiment", 6, 3, seed=1)
    assert other.train_texts != again.train_texts
    # a split does not depend on how many training texts are asked for: test stays the same
    assert load_task("bbc", 2, 3).test_texts == tasks[0].test_texts


def test_no_text_is_in_two_tasks():
    """Class-incremental: one text, one label. Some corpora share short texts ("Robots"); every
    task leaves out the texts that another task's corpus also has, whatever the stream."""
    big = load_tasks(DEFAULT_TASKS, train_per_class=64, test_per_class=48, seed=0)
    owner = {}
    for t in big:
        for text in t.train_texts + t.test_texts:
            assert owner.setdefault(text, t.name) == t.name, (text, owner[text], t.name)
    alone = load_task("chat-b", 64, 48, seed=0)  # a stream of one task gives the same split
    assert alone.test_texts == big[-1].test_texts


def test_stream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope", 4, 4)
    with pytest.raises(ValueError, match="train_per_class"):
        load_task("bbc", 0, 4)
    with pytest.raises(ValueError, match="distinct"):
        load_tasks(["bbc", "bbc"], 4, 4)
    with pytest.raises(ValueError, match="none left for training"):
        load_task("chat-b", 1, 10_000)


# ------------------------------------------------------------------ backbone


@pytest.fixture(scope="module")
def backbone():
    from share_kernels.harness.backbone import load_backbone

    return load_backbone()


@pytest.mark.parametrize("first", [0, 3, 5])
def test_cached_bottom_plus_top_equals_full_model(backbone, first):
    from share_kernels.harness.backbone import TopEncoder, encode_bottom

    tok, bert = backbone
    texts = ["Short one.", "A somewhat longer sentence about football results and the stock market today.", "ok"]
    enc = tok(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**enc).last_hidden_state.double()
        m = enc["attention_mask"].double().unsqueeze(-1)
        ref = (h * m).sum(1) / m.sum(1)
        cached = encode_bottom(tok, bert, texts, first, max_length=24)
        top = TopEncoder(bert, first)
        # rows in another order and a subset: the cut to the longest row must not change results
        idx = torch.tensor([2, 0])
        out = top(*cached.batch(idx))
    assert cached.hidden.shape[0] == 3 and cached.mask.shape == cached.hidden.shape[:2]
    torch.testing.assert_close(out.double(), ref[idx], atol=2e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in top.parameters())
    with pytest.raises(ValueError, match="attention_mask"):
        top(torch.zeros(2, 4, 384), torch.ones(2, 5))


# ------------------------------------------------------------------ metrics


def test_metrics_of_a_known_matrix():
    N = None
    a = [[0.9, N, N], [0.7, 0.8, N], [0.6, 0.85, 0.5]]
    assert average_accuracy(a) == pytest.approx((0.6 + 0.85 + 0.5) / 3)
    assert backward_transfer(a) == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)
    # forgetting of task 0: max(0.9, 0.7) - 0.6; task 1: max(0.8) - 0.85 (negative: it improved)
    assert forgetting(a) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.85)) / 2)
    joint = [[N, N], [0.7, 0.9]]
    assert average_accuracy(joint) == pytest.approx(0.8)
    assert backward_transfer(joint) is None and forgetting(joint) is None


def test_lr_schedule_warms_up_then_decays_to_zero():
    total, lr = 40, 1.0
    lrs = [lr_at(s, total, lr) for s in range(total)]
    assert lrs[0] == pytest.approx(0.25) and max(lrs) == pytest.approx(lr)
    assert all(b <= a for a, b in zip(lrs[4:], lrs[5:])) and 0 < lrs[-1] < 0.05


# ------------------------------------------------------------------ end to end


def tiny_config(**kw) -> HarnessConfig:
    return HarnessConfig(**{**TINY, "methods": TINY_METHODS, **kw})


def check_invariants(results: dict, cfg: HarnessConfig) -> None:
    tasks = results["tasks"]
    T = len(tasks)
    assert [t["name"] for t in tasks] == list(cfg.tasks)
    n_layers = len(cfg.layers) * len(cfg.targets)
    lora = cfg.rank * (384 + 384) * n_layers
    for name in cfg.methods:
        r = results["methods"][name]
        assert r["status"] == "ok", (name, r["status"])
        for proto in ("task_incremental", "class_incremental"):
            s = r[proto]
            if s is None:
                assert proto == "class_incremental" and name == "per-task-lora"
                continue
            a = s["matrix"]
            assert len(a) == T and all(len(row) == T for row in a)
            first_row = T - 1 if name == "joint" else 0
            for i, j in itertools.product(range(T), range(T)):
                v = a[i][j]
                if j > i or i < first_row:
                    assert v is None, (name, proto, i, j)
                    continue
                n = tasks[j]["n_test"]
                assert 0.0 <= v <= 1.0 and v * n == pytest.approx(round(v * n)), (name, proto, i, j, v)
            assert s["average_accuracy"] == pytest.approx(sum(a[-1]) / T)
            if name != "joint":
                # forgetting_j = max_i a[i][j] - a[T-1][j] >= a[j][j] - a[T-1][j] = -bwt_j
                assert s["forgetting"] >= -s["backward_transfer"] - 1e-12 and len(s["curve"]) == T
        if name != "joint" and r["class_incremental"] is not None:
            # after the first task there is one task, one head block and one adapter state
            assert r["class_incremental"]["matrix"][0][0] == r["task_incremental"]["matrix"][0][0]
        assert r["trainable_per_task"] > 0 and r["wall_s"] > 0
        assert r["stored_bytes_total"] == r["shared_bytes"] + T * r["stored_bytes_per_task"]
        assert r["head_params_per_task"] == [t["head_params"] for t in tasks]
        assert all(math.isfinite(x) for x in itertools.chain(*r["losses"]))
    pt = results["methods"]["per-task-lora"]
    assert pt["trainable_per_task"] == lora and pt["stored_bytes_per_task"] == 4 * lora and pt["shared_bytes"] == 0
    # per-task adapters and frozen heads: nothing an old task uses changes, so no forgetting at all
    a = pt["task_incremental"]["matrix"]
    assert all(a[i][j] == a[j][j] for j in range(T) for i in range(j, T))
    for name in ("seq-lora", "joint"):
        assert results["methods"][name]["stored_bytes_per_task"] == 0
        assert results["methods"][name]["shared_bytes"] == 4 * lora
    if "share" in cfg.methods:
        sh = results["methods"]["share"]
        k, p = sh["config"]["k"], sh["config"]["p"]
        assert sh["stored_bytes_per_task"] == 4 * 2 * k * p * n_layers
        assert 20 * sh["stored_bytes_per_task"] <= pt["stored_bytes_per_task"]


@pytest.fixture(scope="module")
def tiny_results():
    cfg = tiny_config(methods=[*TINY_METHODS, "no-such-method"])
    return cfg, run_continual(cfg, progress=False, echo=lambda *_: None)


def test_tiny_run_end_to_end_invariants(tiny_results):
    cfg, results = tiny_results
    assert results["methods"]["no-such-method"]["status"].startswith("not registered")
    cfg = tiny_config()
    check_invariants(results, cfg)
    json.dumps(results)  # JSON-able as is
    if COMPOSED:
        both, inf = results["methods"]["inflora+pslora"], results["methods"]["inflora"]
        assert both["config"]["stability"] == {"lam": 0.1, "alpha": 100.0, "merge": True}
        assert inf["config"]["stability"] is None
        # the same branches are stored; the merged history replaces the sum (one d_out x d_in per layer)
        assert both["stored_bytes_per_task"] == inf["stored_bytes_per_task"]
        assert both["shared_bytes"] == inf["shared_bytes"] + 4 * 384 * 384 * len(cfg.layers) * len(cfg.targets)
        assert both["task_incremental"]["matrix"] != inf["task_incremental"]["matrix"] or both["losses"] != inf["losses"]


def test_composed_method_options():
    from share_kernels.harness.backbone import TopEncoder
    from share_kernels.harness.methods import make_runner
    from share_kernels.harness.run import _parse_options

    if not COMPOSED:
        pytest.skip("InfLoRA is not registered")
    opts = _parse_options(["inflora+pslora.lam=0.5", "inflora+pslora.merge=false", "inflora+pslora.threshold=0.9"])
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    top = TopEncoder(bert, 1)
    runner = make_runner("inflora+pslora", top, r"layers\.0\..*\.(query)", 4, opts["inflora+pslora"], 3)
    cfg = runner.learner.config
    assert runner.name == "inflora+pslora" and cfg.r == 4 and cfg.total_tasks == 3 and cfg.threshold == 0.9
    assert cfg.stability.lam == 0.5 and not cfg.stability.merge and cfg.stability.alpha == 100.0


def test_cli_writes_json_png_and_table(tmp_path, capsys):
    from share_kernels.cli import main

    out = tmp_path / "out"
    rc = main(["continual", "--preset", "tiny", "--methods", "share", "seq-lora", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "share, task-incremental" in printed and "| seq-lora |" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"share", "seq-lora"}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["continual", "--preset", "tiny", "--option", "k=3"]) == 2
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err
    assert main(["continual", "--preset", "tiny", "--methods", "share", "--option", "share.nope=1", "--out", str(out)]) == 2
    assert "unknown option(s) ['nope'] for method 'share'" in capsys.readouterr().err


def test_head_loss_seen_end_to_end_invariants():
    """Each task's loss over every class seen so far: the same invariants hold."""
    cfg = tiny_config(head_loss="seen")
    results = run_continual(cfg, progress=False)
    assert results["config"]["head_loss"] == "seen"
    check_invariants(results, cfg)


def test_config_is_checked():
    with pytest.raises(ValueError, match="head_loss"):
        HarnessConfig(head_loss="all")
    with pytest.raises(ValueError, match="layers"):
        HarnessConfig(layers=(6,))
    with pytest.raises(ValueError, match="epochs"):
        HarnessConfig(epochs=0)
    with pytest.raises(ValueError, match="distinct"):
        HarnessConfig(methods=("share", "share"))


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo) gives the single process's accuracy matrices, and its
    losses up to float rounding (float64, one thread per process in both).

    Share runs with k = r here: with k above the rank of the stacked factors, consolidation pads
    the basis with directions chosen by an SVD of a nearly isotropic matrix, which rounding can
    rotate; Adam is not rotation-invariant, so the padded runs drift apart at the 1e-4 level
    between any two differently rounded runs (DDP or not)."""
    methods = [*REGISTERED, "seq-lora", "joint"]
    options = ["--option", "share.k=8"] if "share" in methods else []
    args = ["continual", "--preset", "tiny", "--dtype", "float64", "--methods", *methods, *options, "--no-progress", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "share_kernels.cli"]
    proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["world_size"] == 2
    cfg = tiny_config(methods=methods, dtype="float64", method_options={"share": {"k": 8}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_continual(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert single["world_size"] == 1
    for m in methods:
        a, b = ddp["methods"][m], single["methods"][m]
        for proto in ("task_incremental", "class_incremental"):
            assert a[proto]["matrix"] == b[proto]["matrix"], (m, proto)
        la, lb = list(itertools.chain(*a["losses"])), list(itertools.chain(*b["losses"]))
        assert len(la) == len(lb) > 0
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-9, atol=1e-12, msg=m)


# ------------------------------------------------------------------ the long stream


def test_long_stream_has_20_tasks_with_disjoint_classes_and_its_own_registry():
    from share_kernels.harness.data import LONG_TASKS

    tasks = load_tasks(LONG_TASKS, train_per_class=4, test_per_class=3, seed=0)
    assert len(tasks) == 20 and all(2 <= t.num_classes <= 3 for t in tasks)
    owner = {}
    for t in tasks:
        for text in t.train_texts + t.test_texts:
            assert owner.setdefault(text, t.name) == t.name, (text, owner[text], t.name)
    # the default stream's corpora overlap the long stream's (same languages): no mixing
    with pytest.raises(ValueError, match="mix"):
        load_tasks(["bbc", "news-a"], 4, 3)


def test_long_stream_run_records_k_protected_dims_and_bytes_after_every_task(tmp_path):
    from share_kernels.harness.data import LONG_TASKS
    from share_kernels.harness.report import write_png

    methods = ["share", "inflora", "per-task-lora"]
    cfg = tiny_config(tasks=LONG_TASKS[:9], methods=methods, train_per_class=2, test_per_class=2)
    results = run_continual(cfg, progress=False)
    T = 9
    for m in methods:
        r = results["methods"][m]
        after = r["after_task"]
        assert len(after) == T and after[-1]["stored_bytes"] == r["stored_bytes_total"]
        assert all(a["stored_bytes"] <= b["stored_bytes"] for a, b in zip(after, after[1:]))
    sh = results["methods"]["share"]["after_task"]
    assert all(set(a["k"]) == {"layers.0.attention.self.query", "layers.0.attention.self.value"} for a in sh)
    assert all(v == 16 for a in sh[1:] for v in a["k"].values())  # fixed k once the subspace exists
    inf = results["methods"]["inflora"]["after_task"]
    assert all(a["protected"][n] <= b["protected"][n] for a, b in zip(inf, inf[1:]) for n in a["protected"])
    assert all(0 <= v <= cfg.rank for a in inf for v in a["directions"].values())
    write_png(results, str(tmp_path / "long.png"))
    assert (tmp_path / "long.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
