"""ShareLinear, the multi-task reference, the Share procedure, save / load and accounting."""

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import share_kernels.nn.share_linear as share_linear_mod
from share_kernels.continual import (
    ContinualLearner,
    ShareConfig,
    adapter_stats,
    base_state_dict,
    build_subspace_from_lora,
    consolidate_layer,
    init_subspace_from_lora,
    load_adapters,
    save_adapters,
    wrap,
)
from share_kernels.continual.io import saved_files
from share_kernels.nn import ShareLinear
from share_kernels.ops.multi_task_linear import multi_task_linear_reference

F64 = torch.float64


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def make_layer(d_in=13, d_out=11, k=4, p=2, scale=0.7, bias=True, dtype=F64):
    return ShareLinear.from_linear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), k=k, p=p, scale=scale)


def randomize(layer, names=None):
    """Stand-in for training: fresh random values in the given tasks' parameters (all: None)."""
    with torch.no_grad():
        for name in layer.tasks if names is None else names:
            for prm in layer.task_parameters(name):
                prm.copy_(torch.randn_like(prm))


def orthonormal_error(Q):
    eye = torch.eye(Q.shape[1], dtype=F64)
    return float((Q.to(F64).t() @ Q.to(F64) - eye).abs().max())


def tiny_mlp(dtype=F64):
    return nn.Sequential(nn.Linear(9, 14, dtype=dtype), nn.GELU(), nn.Linear(14, 5, dtype=dtype))


# ----------------------------------------------------------------------------- the layer


def test_from_linear_keeps_the_base_layer():
    lin = nn.Linear(13, 7)
    w = lin.weight.detach().clone()
    layer = ShareLinear.from_linear(lin, k=32, p=3)
    assert layer.base_layer is lin and layer.base_layer.weight.data_ptr() == lin.weight.data_ptr()
    assert torch.equal(lin.weight, w) and not lin.weight.requires_grad and not lin.bias.requires_grad
    assert layer.k == layer.max_k == 7  # capped at min(d_in, d_out)
    assert layer.U.shape == (13, 7) and layer.V.shape == (7, 7)
    assert orthonormal_error(layer.U) < 1e-6 and orthonormal_error(layer.V) < 1e-6
    assert layer.tasks == [] and layer.active_task is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("lora_rank", [None, 3])
def test_first_task_is_an_exact_noop(bias, dtype, lora_rank):
    layer = make_layer(bias=bias, dtype=dtype)
    layer.add_task("a", lora_rank=lora_rank)
    layer.set_task("a")
    x = torch.randn(2, 5, 13, dtype=dtype)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.delta_weight("a")) == 0


def test_later_task_starts_from_the_previous_one():
    layer = make_layer()
    layer.add_task("a")
    layer.set_task("a")
    randomize(layer)
    layer.add_task("b")
    layer.set_task("b")
    assert torch.equal(layer.delta_weight("b"), layer.delta_weight("a"))
    assert layer.expand(2) == 2  # temporary directions with zero coefficients: same update
    assert rel(layer.delta_weight("b"), layer.delta_weight("a")) < 1e-15
    x = torch.randn(6, 13, dtype=F64)
    yb = layer(x)
    layer.set_task("a")
    assert rel(yb, layer(x)) < 1e-15
    layer.set_task(None)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_only_the_active_task_trains():
    layer = make_layer()
    for t in ("a", "b"):
        layer.add_task(t)
    layer.set_task("a")
    randomize(layer)
    layer.set_task("b")
    layer.expand(2)
    trainable = {n for n, prm in layer.named_parameters() if prm.requires_grad}
    assert trainable == {"eps_a.b", "eps_b.b", "U_tmp", "V_tmp", "eps_a_tmp", "eps_b_tmp"}
    before = {n: prm.detach().clone() for n, prm in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(8, 13, dtype=F64)).square().sum().backward()
        opt.step()
    for n, prm in layer.named_parameters():
        if n in trainable:
            assert prm.grad is not None and not torch.equal(prm, before[n]), n
        else:
            assert prm.grad is None and torch.equal(prm, before[n]), n
    layer.set_task(None)
    assert not any(prm.requires_grad for prm in layer.parameters())


def layer_in_training(mode, **kw):
    """A layer whose active task trains as ``mode``: "plain" (coefficients of a first task),
    "expanded" (a second task with φ = 2 temporary directions) or "lora" (the first task as a
    rank-3 LoRA); every parameter random."""
    layer = make_layer(**kw)
    layer.add_task("a", lora_rank=3 if mode == "lora" else None)
    layer.set_task("a")
    if mode == "expanded":
        randomize(layer)
        layer.add_task("b")
        layer.set_task("b")
        layer.expand(2)
    randomize(layer)
    return layer


@pytest.mark.parametrize("mode", ["plain", "expanded", "lora"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_delta_weight_agrees_with_the_forward(mode, bias, k):
    layer = layer_in_training(mode, k=k, bias=bias)
    name = layer.active_task
    x = torch.randn(3, 13, 4, dtype=F64).transpose(1, 2)  # non-contiguous, leading dims
    ref = F.linear(x, layer.base_layer.weight + layer.delta_weight(name), layer.base_layer.bias)
    assert rel(layer(x), ref) < 1e-12
    # float32 layer against the float64 reference of the same parameters
    layer32 = layer.float()
    assert rel(layer32(x.float()).double(), ref) < 1e-5


def test_delta_weight_is_scale_V_eps_b_eps_aT_UT():
    layer = make_layer()
    layer.add_task("a")
    randomize(layer)
    dw = layer.scale * layer.V @ layer.eps_b["a"] @ layer.eps_a["a"].t() @ layer.U.t()
    assert rel(layer.delta_weight("a"), dw) < 1e-14


def test_forward_is_one_lowrank_linear_call(monkeypatch):
    calls = []
    real = share_linear_mod.lowrank_linear

    def counting(x, weight, bias, U, C):
        calls.append((U.shape, C.shape))
        return real(x, weight, bias, U, C)

    monkeypatch.setattr(share_linear_mod, "lowrank_linear", counting)
    for k, p, rank_plain, rank_expanded in ((4, 2, 2, 2), (2, 4, 2, 4), (2, 3, 2, 3), (1, 3, 1, 3)):
        # rank min(p, k'): the task's factors when p < k' (k' = k, + 2 while expanded), else the subspace
        calls.clear()
        layer = make_layer(k=k, p=p)
        layer.add_task("a")
        layer.set_task("a")
        layer(torch.randn(5, 13, dtype=F64))
        layer.add_task("b")
        layer.set_task("b")
        layer.expand(2)
        layer(torch.randn(5, 13, dtype=F64))
        assert calls == [((13, rank_plain), (rank_plain, 11)), ((13, rank_expanded), (rank_expanded, 11))], (k, p)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_task_ids_forward_matches_per_task_forwards(per_sequence):
    layer = make_layer()
    for t in ("a", "b", "c"):
        layer.add_task(t)
    randomize(layer)
    x = torch.randn(6, 4, 13, dtype=F64)
    ids = torch.tensor([0, -1, 2, 1, -1, 2]) if per_sequence else torch.randint(-1, 3, (6, 4))
    with torch.no_grad():
        out = layer(x, task_ids=ids)
        per_task = []
        for t in layer.tasks:
            layer.set_task(t)
            per_task.append(layer(x))
        layer.set_task(None)
        base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    full_ids = ids[:, None].expand(6, 4) if per_sequence else ids
    for i in range(6):
        for j in range(4):
            t = int(full_ids[i, j])
            if t < 0:
                assert torch.equal(out[i, j], base[i, j])  # bit-identical to F.linear
            else:
                assert rel(out[i, j], per_task[t][i, j]) < 1e-12


def test_task_ids_forward_is_inference_only():
    layer = make_layer()
    layer.add_task("a")
    layer.set_task("a")
    x = torch.randn(3, 13, dtype=F64)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x, task_ids=torch.zeros(3, dtype=torch.long))
    layer.add_task("b")
    layer.set_task("b")
    layer.expand(2)
    with torch.no_grad(), pytest.raises(ValueError, match="still in training"):
        layer(x, task_ids=torch.zeros(3, dtype=torch.long))


def test_multi_task_linear_reference_rejects_bad_inputs():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    U, cores, V = torch.randn(6, 3), torch.randn(2, 3, 3), torch.randn(5, 3)
    ok = torch.tensor([0, 1, -1, 1])
    assert multi_task_linear_reference(x, w, None, U, cores, V, ok).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\[-1, T=2\)"):
        multi_task_linear_reference(x, w, None, U, cores, V, torch.tensor([0, 2, 0, 0]))
    with pytest.raises(ValueError, match=r"\[-1, T=2\)"):
        multi_task_linear_reference(x, w, None, U, cores, V, torch.tensor([0, -2, 0, 0]))
    with pytest.raises(TypeError, match="integer"):
        multi_task_linear_reference(x, w, None, U, cores, V, ok.float())
    with pytest.raises(ValueError, match="task_ids must have shape"):
        multi_task_linear_reference(x, w, None, U, cores, V, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cores must have shape"):
        multi_task_linear_reference(x, w, None, U, torch.randn(2, 3, 2), V, ok)
    with pytest.raises(ValueError, match="V must have shape"):
        multi_task_linear_reference(x, w, None, U, cores, torch.randn(5, 2), ok)
    with pytest.raises(TypeError, match="same dtype"):
        multi_task_linear_reference(x.double(), w, None, U, cores, V, ok)


def test_bad_task_names():
    layer = make_layer()
    layer.add_task("a")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_task("a")
    for bad in ("", "a.b", "-a", "a b", "keys", "__base__", "a/b", "..", "x" * 101, 3, None):
        with pytest.raises((ValueError, TypeError), match="invalid task name"):
            layer.add_task(bad)
    layer.add_task("x" * 100)  # the longest name
    for call in (layer.set_task, layer.delta_weight, layer.task_factors, layer.task_tensors):
        with pytest.raises(ValueError, match="unknown task 'zz'"):
            call("zz")
    with pytest.raises(ValueError, match="only for the first task"):
        layer.add_task("b", lora_rank=2)


def test_bad_layer_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        ShareLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="k must be a positive int"):
        ShareLinear.from_linear(nn.Linear(4, 4), k=0)
    layer = make_layer()
    layer.add_task("a")
    with pytest.raises(ValueError, match="set_subspace"):
        layer.set_subspace(torch.randn(13, 3), torch.randn(11, 2), {"a": (torch.zeros(3, 2),) * 2})
    with pytest.raises(ValueError, match="exactly the tasks"):
        layer.set_subspace(torch.randn(13, 3), torch.randn(11, 3), {})


# ----------------------------------------------------------------------------- the procedure


def three_tasks(k=16, p=2, phi=2, lora_first=False):
    """A float64 layer whose third task is in training with temporary directions."""
    layer = make_layer(d_in=23, d_out=19, k=k, p=p)
    layer.add_task("a", lora_rank=3 if lora_first else None)
    layer.set_task("a")
    randomize(layer)
    consolidate_layer(layer, k)
    for t in ("b", "c"):
        layer.add_task(t)
        layer.set_task(t)
        layer.expand(phi)
        randomize(layer, [t])
        if t == "b":
            consolidate_layer(layer, k)
    return layer


def test_consolidation_is_exact_when_k_covers_every_task():
    layer = three_tasks(k=16)  # stacked rank <= 3 tasks x p=2 = 6 <= 16
    before = {t: layer.delta_weight(t).detach() for t in layer.tasks}
    assert layer.training_task == "c"
    changes = consolidate_layer(layer, 16)
    assert layer.training_task is None and layer.U_tmp is None and layer.subspace_built
    assert layer.k == 16
    for t in layer.tasks:
        assert rel(layer.delta_weight(t), before[t]) < 1e-12, t
        assert changes[t] < 1e-12, t
    assert orthonormal_error(layer.U) < 1e-12 and orthonormal_error(layer.V) < 1e-12


@pytest.mark.parametrize("lora_first", [False, True])
def test_consolidation_records_what_it_changed(lora_first):
    layer = three_tasks(k=3, lora_first=lora_first)  # rank 6 does not fit in k = 3
    before = {t: layer.delta_weight(t).detach() for t in layer.tasks}
    changes = consolidate_layer(layer, 3)
    assert layer.k == 3
    for t in layer.tasks:
        measured = rel(layer.delta_weight(t), before[t])
        assert measured > 1e-3
        assert changes[t] == pytest.approx(measured, rel=1e-9), t


def test_reprojection_changes_nothing_when_the_subspace_does_not_move():
    layer = three_tasks(k=3)
    consolidate_layer(layer, 3)
    U, V = layer.U.clone(), layer.V.clone()
    before = {t: layer.delta_weight(t).detach() for t in layer.tasks}
    changes = consolidate_layer(layer, 3)  # nothing new: the stacked factors span the same space
    for t in layer.tasks:
        assert rel(layer.delta_weight(t), before[t]) < 1e-12 and changes[t] < 1e-12
    # same span (the basis may rotate): the projector is unchanged
    assert rel(layer.U @ layer.U.t(), U @ U.t()) < 1e-12 and rel(layer.V @ layer.V.t(), V @ V.t()) < 1e-12


def test_keep_subspace_leaves_old_tasks_bit_identical():
    layer = three_tasks(k=6)
    U, V = layer.U.clone(), layer.V.clone()
    old = {t: (layer.eps_a[t].detach().clone(), layer.eps_b[t].detach().clone()) for t in ("a", "b")}
    A, B = (f.detach() for f in layer.task_factors("c"))
    changes = consolidate_layer(layer, 6, keep_subspace=True)
    assert torch.equal(layer.U, U) and torch.equal(layer.V, V)
    for t, (ea, eb) in old.items():
        assert torch.equal(layer.eps_a[t], ea) and torch.equal(layer.eps_b[t], eb) and changes[t] == 0.0
    # the new task is its projection onto the kept subspace
    assert torch.allclose(layer.eps_a["c"], U.t() @ A) and torch.allclose(layer.eps_b["c"], V.t() @ B)
    assert changes["c"] > 0


def test_build_subspace_from_lora_pads_with_orthonormal_directions():
    layer = make_layer(d_in=23, d_out=19, k=8, p=2)
    factors = [(torch.randn(2, 23, dtype=F64), torch.randn(19, 2, dtype=F64)) for _ in range(2)]  # rank 4 < k
    build_subspace_from_lora(layer, factors)
    assert layer.k == 8 and layer.subspace_built
    assert orthonormal_error(layer.U) < 1e-12 and orthonormal_error(layer.V) < 1e-12
    for A, B in factors:  # the adapters lie in the subspace
        assert rel(layer.U @ (layer.U.t() @ A.t()), A.t()) < 1e-12
        assert rel(layer.V @ (layer.V.t() @ B), B) < 1e-12
    with pytest.raises(ValueError, match=r"LoRA factors #0: expected A \(r, d_in=23\)"):
        build_subspace_from_lora(make_layer(d_in=23, d_out=19), [(torch.randn(2, 22), torch.randn(19, 2))])
    layer.add_task("a")
    with pytest.raises(ValueError, match="without tasks"):
        build_subspace_from_lora(layer, factors)


def test_init_subspace_from_lora_on_a_model_skips_the_lora_phase():
    model = tiny_mlp()
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=4, p=2)
    factors = {
        "0": [(torch.randn(2, 9, dtype=F64), torch.randn(14, 2, dtype=F64))],
        "2": [(torch.randn(3, 14, dtype=F64), torch.randn(5, 3, dtype=F64))],
    }
    with pytest.raises(ValueError, match=r"missing \['2'\], not Share layers \['9'\]"):
        init_subspace_from_lora(model, {"0": factors["0"], "9": factors["2"]})
    with pytest.raises(ValueError, match="layer '2': LoRA factors #0"):
        init_subspace_from_lora(model, {"0": factors["0"], "2": factors["0"]})
    assert not model[0].subspace_built  # checked everything before changing anything
    init_subspace_from_lora(model, factors)
    A, B = factors["2"][0]
    assert rel(model[2].U @ (model[2].U.t() @ A.t()), A.t()) < 1e-12
    learner.begin_task("a")  # a subspace exists: coefficients (an exact no-op) plus temporary directions
    assert model[0].lora_A is None and model[0].U_tmp is not None
    x = torch.randn(4, 9, dtype=F64)
    with torch.no_grad():
        y = model(x)
        learner.set_task(None)
        assert rel(y, model(x)) < 1e-15


def _lora_with_spectrum(s, d_in=23, d_out=19):
    """One LoRA (A, B) whose stacked Aᵀ and B both have singular values ``s``."""
    qa = torch.linalg.qr(torch.randn(d_in, len(s), dtype=F64)).Q
    qb = torch.linalg.qr(torch.randn(d_out, len(s), dtype=F64)).Q
    s = torch.tensor(s, dtype=F64)
    return (qa * s).t(), qb * s


@pytest.mark.parametrize(
    "k, max_k, expected",
    [("0.6", 8, 2), (0.5, 8, 1), ("0.9", 8, 4), ("0.95", 8, 5), ("0.95", 3, 3), ("1.0", 8, 5), (3, 8, 3)],
)
def test_energy_threshold_picks_the_smallest_k(k, max_k, expected):
    # sigma^2 = 9, 4, 1, 1, 1 of 16: cumulative 0.5625, 0.8125, 0.875, 0.9375, 1
    cfg = ShareConfig(k=k, max_k=max_k)
    layer = make_layer(d_in=23, d_out=19, k=cfg.layer_k)
    build_subspace_from_lora(layer, [_lora_with_spectrum([3.0, 2.0, 1.0, 1.0, 1.0])], cfg.k)
    assert layer.k == expected


def test_energy_threshold_takes_the_larger_k_of_the_two_factors():
    A, _ = _lora_with_spectrum([3.0, 2.0, 1.0, 1.0, 1.0])  # A alone: 2 for 0.6
    B = torch.linalg.qr(torch.randn(19, 5, dtype=F64)).Q  # flat spectrum: 3 for 0.6
    layer = make_layer(d_in=23, d_out=19, k=8)
    build_subspace_from_lora(layer, [(A, B)], 0.6)
    assert layer.k == 3


def test_share_config_validation():
    assert ShareConfig(k="0.6").k == 0.6 and ShareConfig(k="0.6").energy == 0.6
    assert ShareConfig(k="12").k == 12 and ShareConfig(k=12).energy is None
    assert ShareConfig(k=0.6, max_k=20).layer_k == 20
    for bad in (
        {"k": 0},
        {"k": "1.5"},
        {"k": "many"},
        {"k": True},
        {"p": 0},
        {"phi": -1},
        {"r": 2.0},
        {"scale": float("nan")},
        {"merge": 1},
    ):
        with pytest.raises(ValueError, match="ShareConfig"):
            ShareConfig(**bad)


# ----------------------------------------------------------------------------- save / load


def trained_model(tmp_tasks=("a", "b"), **cfg):
    torch.manual_seed(1)
    model = tiny_mlp()
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], **{"k": 4, "p": 2, "r": 2, **cfg})
    for t in tmp_tasks:
        learner.begin_task(t)
        with torch.no_grad():
            for prm in learner.trainable_parameters():
                prm.add_(0.3 * torch.randn_like(prm))
        learner.end_task(t)
    return model, learner


def outputs(model, tasks, x):
    out = {}
    with torch.no_grad():
        for t in tasks:
            for layer in model.modules():
                if isinstance(layer, ShareLinear):
                    layer.set_task(t)
            out[t] = model(x)
    return out


def rewrite_with_digest(directory, name, data):
    """Replace a saved file's bytes and record their digest in the manifest (a deliberate edit
    that passes the integrity checks, to reach the checks behind them)."""
    import hashlib

    from share_kernels.continual.io import _manifest_digest

    with open(saved_files(directory)[name], "wb") as f:
        f.write(data)
    cfg = json.loads((directory / "share_config.json").read_text())
    cfg["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    cfg["manifest_sha256"] = _manifest_digest(cfg)
    (directory / "share_config.json").write_text(json.dumps(cfg))


def test_save_load_round_trip(tmp_path):
    model, learner = trained_model()
    x = torch.randn(7, 9, dtype=F64)
    ref = outputs(model, ["a", "b", None], x)
    save_adapters(model, tmp_path)
    files = saved_files(tmp_path)
    assert sorted(files) == ["shared.safetensors", "task-a.safetensors", "task-b.safetensors"]
    (version,) = {os.path.basename(os.path.dirname(p)) for p in files.values()}  # one version folder
    assert sorted(os.listdir(tmp_path)) == [".share_lock", "share_config.json", version]
    cfg = json.loads((tmp_path / "share_config.json").read_text())
    assert cfg["method"] == "share" and cfg["tasks"] == ["a", "b"] and cfg["config"]["k"] == 4
    assert cfg["layers"]["0"]["shared"] == {"U": [9, 4], "V": [14, 4]}
    # a task is only its coefficients: 2 layers x 2 x (4 x 2) float64 plus a small header
    assert os.path.getsize(files["task-a.safetensors"]) < 1024

    fresh = tiny_mlp()
    fresh.load_state_dict(base_state_dict(model))  # the base weights, under the plain model's names
    assert load_adapters(fresh, tmp_path) == ["a", "b"]  # wraps the unwrapped model
    assert isinstance(fresh[0], ShareLinear) and fresh[0].active_task is None
    got = outputs(fresh, ["a", "b", None], x)
    for t in ref:
        assert torch.equal(got[t], ref[t]), t
    # into an already wrapped model, and continuing to learn from there
    load_adapters(fresh, tmp_path)
    learner2 = ContinualLearner(fresh, "share")
    assert learner2.tasks == ["a", "b"] and learner2.config.k == 4
    learner2.begin_task("c")
    assert fresh[0].U_tmp is not None  # a later task: temporary directions, not the LoRA phase


def test_one_new_task_ships_as_one_file_when_the_subspace_is_kept(tmp_path):
    model, learner = trained_model(merge=False)
    save_adapters(model, tmp_path)
    before = saved_files(tmp_path)
    inode = os.stat(before["shared.safetensors"]).st_ino
    learner.begin_task("c")
    learner.end_task("c")
    save_adapters(model, tmp_path, tasks=["c"])
    after = saved_files(tmp_path)
    assert after["shared.safetensors"] == before["shared.safetensors"]  # referenced, not rewritten
    assert os.stat(after["shared.safetensors"]).st_ino == inode
    assert after["task-a.safetensors"] == before["task-a.safetensors"]
    # the new version folder holds the new task alone
    assert os.listdir(os.path.dirname(after["task-c.safetensors"])) == ["task-c.safetensors"]
    fresh = tiny_mlp()
    assert load_adapters(fresh, tmp_path) == ["a", "b", "c"]


def test_saving_a_subset_after_the_subspace_moved_drops_stale_tasks(tmp_path):
    model, learner = trained_model()
    save_adapters(model, tmp_path)
    learner.begin_task("c")
    learner.end_task("c")
    with pytest.warns(UserWarning, match="task-a.safetensors"):
        save_adapters(model, tmp_path, tasks=["c"])
    assert json.loads((tmp_path / "share_config.json").read_text())["tasks"] == ["c"]
    assert sorted(saved_files(tmp_path)) == ["shared.safetensors", "task-c.safetensors"]


def test_load_reports_what_does_not_fit(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    model, _ = trained_model()
    save_adapters(model, tmp_path)
    other = nn.Sequential(nn.Linear(9, 15, dtype=F64), nn.GELU(), nn.Linear(15, 5, dtype=F64))
    with pytest.raises(ValueError, match="layer '0': expected in_features=9, out_features=14; got 9, 15"):
        load_adapters(other, tmp_path)
    with pytest.raises(ValueError, match="layer '2': the model has no nn.Linear"):
        load_adapters(nn.Sequential(nn.Linear(9, 14, dtype=F64)), tmp_path)
    wrapped = wrap(tiny_mlp(), "share", ["0"], k=4, p=2)
    with pytest.raises(ValueError, match=r"saved but not in the model \['2'\]"):
        load_adapters(wrapped, tmp_path)
    wrapped = wrap(tiny_mlp(), "share", ["0", "2"], k=4, p=3)
    with pytest.raises(ValueError, match="layer '0': saved with"):
        load_adapters(wrapped, tmp_path)

    path = saved_files(tmp_path)["task-b.safetensors"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["2.eps_a"] = torch.zeros(4, 3, dtype=F64)
    rewrite_with_digest(tmp_path, "task-b.safetensors", save(tensors, metadata=meta))
    fresh = tiny_mlp()
    with pytest.raises(ValueError, match=r"layer '2', tensor 'eps_a': expected shape \(4, 2\), got \(4, 3\)"):
        load_adapters(fresh, tmp_path)
    assert isinstance(fresh[0], nn.Linear)  # nothing changed on failure
    del tensors["2.eps_a"]
    rewrite_with_digest(tmp_path, "task-b.safetensors", save(tensors, metadata=meta))
    with pytest.raises(ValueError, match=r"missing tensors \['2.eps_a'\]"):
        load_adapters(fresh, tmp_path)
    os.remove(path)
    with pytest.raises(ValueError, match="task-b.safetensors: file .* is missing"):
        load_adapters(fresh, tmp_path)
    with pytest.raises(ValueError, match="holds no share_config.json"):
        load_adapters(fresh, tmp_path / "nowhere")


def test_save_refuses_a_task_in_progress_and_unknown_tasks(tmp_path):
    model, learner = trained_model()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['zz'\]"):
        save_adapters(model, tmp_path, tasks=["zz"])
    learner.begin_task("c")
    with pytest.raises(ValueError, match="still in training"):
        save_adapters(model, tmp_path)
    assert not os.path.exists(tmp_path / "share_config.json")


def test_load_refuses_a_model_with_other_tasks(tmp_path):
    model, _ = trained_model()
    save_adapters(model, tmp_path, tasks=["a"])
    with pytest.raises(ValueError, match=r"holds tasks \['b'\]"):
        load_adapters(model, tmp_path)


# ----------------------------------------------------------------------------- accounting


def test_adapter_stats_counts():
    model, _ = trained_model(phi=2)
    st = adapter_stats(model, lora_rank=4)
    # layer 0: 9 -> 14, layer 2: 14 -> 5; k = 4, p = 2, phi = min(2, d - k) = (2, 1)
    assert st.stored_per_task == 2 * (2 * 4 * 2)
    assert st.trainable_per_task == (16 + 2 * (9 + 14 + 4)) + (16 + 1 * (14 + 5 + 4))
    assert st.shared == 4 * (9 + 14) + 4 * (14 + 5)
    assert st.lora_per_task == 4 * (9 + 14) + 4 * (14 + 5)
    assert st.bytes_per_param == 8 and st.tasks == 2 and st.layers == 2
    assert st.trainable_ratio == st.lora_per_task / st.trainable_per_task
    assert st.total_bytes(10) == (st.shared + 10 * st.stored_per_task) * 8
    row = st.rows([10])[0]
    assert row["tasks"] == 10 and row["total_ratio"] == st.lora_total_bytes(10) / st.total_bytes(10)
    assert "vs LoRA r=4" in str(st) and "trainable per task" in str(st)
    assert adapter_stats(model).lora_rank == 2  # the config's r


def test_bench_suite_quick_runs():
    from share_kernels.bench import share as suite

    rows = suite.run(torch.device("cpu"), "quick", echo=lambda *a: None)
    params = [r for r in rows if r["case"].startswith("params")]
    steps = [r for r in rows if r["case"].startswith("train_step")]
    assert len(params) == 9 and all(r["trainable_ratio"] > 1 and r["total_ratio"] > 1 for r in params)
    assert {r["case"] for r in steps} >= {"train_step share p=8 phi=2", "train_step share p=8 phi=0"}
    assert all(r["ms"] > 0 and r["saved MB"] > 0 for r in steps)


def test_express_pads_when_k_is_below_p_and_the_rank():
    """k < p < r: the k x k core keeps all its k directions, padded to p columns."""
    from share_kernels.continual.share import _express

    U = torch.linalg.qr(torch.randn(13, 2, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(11, 2, dtype=F64)).Q
    A, B = torch.randn(13, 6, dtype=F64), torch.randn(11, 6, dtype=F64)
    ea, eb = _express(A, B, U, V, p=4)
    assert ea.shape == (2, 4) and eb.shape == (2, 4)
    core = (U.t() @ A) @ (V.t() @ B).t()
    assert rel(ea @ eb.t(), core) < 1e-12


@pytest.mark.parametrize("mode", ["plain", "expanded", "lora"])
@pytest.mark.parametrize("k,p", [(4, 2), (2, 4), (3, 3)])
def test_training_gradients_match_the_dense_update(mode, k, p):
    """Whichever rank the forward runs at (the task's factors or the subspace), every trainable
    tensor gets the gradient of ``F.linear(x, W + delta_weight)``."""
    layer = layer_in_training(mode, k=k, p=p)
    name = layer.active_task
    params = layer.task_parameters(name)
    x = torch.randn(2, 5, 13, dtype=F64)
    g = torch.randn(2, 5, 11, dtype=F64)
    got = torch.autograd.grad((layer(x) * g).sum(), params)
    ref_out = F.linear(x, layer.base_layer.weight + layer.delta_weight(name), layer.base_layer.bias)
    want = torch.autograd.grad((ref_out * g).sum(), params)
    assert len(params) == {"plain": 2, "expanded": 6, "lora": 2}[mode]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12
