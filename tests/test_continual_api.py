"""The method-independent continual-learning API: target matching, wrapping, the five learner
calls, task routing, and the method interface."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from share_kernels.continual import (
    ContinualLearner,
    Method,
    ParamCounts,
    adapter_layers,
    adapter_stats,
    get_method,
    match_linear_layers,
    register_method,
    task_ids,
    wrap,
)
from share_kernels.nn import ShareLinear

F64 = torch.float64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.xq_proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 11)
        self.norm = nn.LayerNorm(8)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for b in self.layers:
            x = b.mlp(b.q_proj(x) + b.xq_proj(x))
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------- matching


def test_target_modules_suffixes():
    assert match_linear_layers(LM(), ["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]  # not xq_proj
    assert match_linear_layers(LM(), ["mlp.2", "lm_head"]) == ["layers.0.mlp.2", "layers.1.mlp.2", "lm_head"]
    assert match_linear_layers(LM(), ("layers.1.q_proj",)) == ["layers.1.q_proj"]


def test_target_modules_regex():
    assert match_linear_layers(LM(), r"layers\.\d+\.(q|xq)_proj") == [
        "layers.0.q_proj",
        "layers.0.xq_proj",
        "layers.1.q_proj",
        "layers.1.xq_proj",
    ]
    assert match_linear_layers(LM(), r"layers\.1\..*") == [
        "layers.1.q_proj",
        "layers.1.xq_proj",
        "layers.1.mlp.0",
        "layers.1.mlp.2",
    ]
    with pytest.raises(ValueError, match="not a valid regex"):
        match_linear_layers(LM(), "layers(")


def test_target_modules_all_linear_skips_the_output_head():
    names = match_linear_layers(LM(), "all-linear")
    assert len(names) == 8 and "lm_head" not in names
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert match_linear_layers(plain, "all-linear") == ["0", "2"]
    # nn.MultiheadAttention uses out_proj.weight without calling out_proj: never wrapped
    encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    assert match_linear_layers(encoder, "all-linear") == ["linear1", "linear2"]


def test_nothing_matched_names_what_was_searched():
    with pytest.raises(ValueError) as e:
        match_linear_layers(LM(), ["k_proj", "v_proj"])
    msg = str(e.value)
    assert "['k_proj', 'v_proj']" in msg and "layers.0.q_proj" in msg and "lm_head" in msg
    with pytest.raises(ValueError, match="searched the nn.Linear and Conv1D layers: none"):
        match_linear_layers(nn.Sequential(nn.ReLU()), "all-linear")
    with pytest.raises(TypeError, match="target_modules must be"):
        match_linear_layers(LM(), 3)


# ----------------------------------------------------------------------------- wrapping


def test_wrap_replaces_in_place_and_freezes():
    model = LM()
    q = model.layers[0].q_proj
    out = wrap(model, "share", ["q_proj"], k=4, p=2)
    assert out is model
    layer = model.layers[0].q_proj
    assert isinstance(layer, ShareLinear) and layer.base_layer is q and (layer.k, layer.p) == (4, 2)
    assert list(adapter_layers(model)) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert not any(p.requires_grad for p in model.parameters())
    assert model.continual_config.k == 4
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no task active: the base model
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(model, "share", ["mlp.0"])


def test_wrap_rejects_unknown_method_and_options():
    with pytest.raises(ValueError, match=r"unknown method 'lora'; registered methods are \[.*'share'"):
        wrap(LM(), "lora", ["q_proj"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for method 'share'; valid options are"):
        wrap(LM(), "share", ["q_proj"], rank=4)
    with pytest.raises(ValueError, match="ShareConfig.p"):
        wrap(LM(), "share", ["q_proj"], p=0)


# ----------------------------------------------------------------------------- the five calls


def mlp():
    return nn.Sequential(nn.Linear(10, 24, dtype=F64), nn.Tanh(), nn.Linear(24, 6, dtype=F64))


def task_data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 10, generator=g, dtype=F64)
    w = torch.randn(10, 6, generator=g, dtype=F64)
    return x, torch.tanh(x @ w)


def run_three_tasks(k):
    torch.manual_seed(0)
    model = mlp()
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=k, p=2, phi=2, r=2, scale=1.0)
    data = {t: task_data(i) for i, t in enumerate(["a", "b", "c"])}
    losses, snapshots = {}, []
    for t, (x, y) in data.items():
        learner.begin_task(t)
        assert learner.current_task == t and learner.tasks[-1] == t
        opt = torch.optim.Adam(learner.trainable_parameters(), lr=3e-2)
        curve = []
        for _ in range(40):
            loss = nn.functional.mse_loss(model(x), y) + learner.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[t] = curve
        before = outputs_per_task(model, learner, data)
        layer_dw = {t2: {n: l.delta_weight(t2).detach() for n, l in learner.layers.items()} for t2 in learner.tasks}
        report = learner.end_task(t)
        snapshots.append((before, outputs_per_task(model, learner, data), layer_dw, report))
    return model, learner, data, losses, snapshots


def outputs_per_task(model, learner, data):
    out = {}
    with torch.no_grad():
        for t in learner.tasks:
            learner.set_task(t)
            out[t] = model(data["a"][0])
    learner.set_task(learner.current_task)
    return out


def test_five_calls_through_three_tasks_exact_when_k_covers_them():
    model, learner, data, losses, snapshots = run_three_tasks(k=16)
    for t, curve in losses.items():
        assert curve[-1] < 0.5 * curve[0], t
    assert learner.tasks == ["a", "b", "c"] and learner.current_task is None
    assert [r.after for r in learner.reports] == ["a", "b", "c"]
    # k covers every task's rank (3 tasks x p = 6 <= 16, and the LoRA phase's r = p): no task's
    # output moves at any consolidation, and every recorded change is 0
    for before, after, _, report in snapshots:
        assert all(c < 1e-10 for per_layer in report.change.values() for c in per_layer.values())
        for t, y in before.items():
            assert float((after[t] - y).norm() / y.norm()) < 1e-10, (report.after, t)


def test_old_tasks_change_only_by_the_recorded_consolidation_change():
    model, learner, data, losses, snapshots = run_three_tasks(k=3)  # 6 directions do not fit in 3
    before, after, layer_dw, report = snapshots[-1]
    assert report.after == "c" and set(report.change) == {"a", "b", "c"}
    assert max(report.max_change().values()) > 1e-3
    for t, per_layer in report.change.items():
        for n, c in per_layer.items():
            old = layer_dw[t][n]
            new = learner.layers[n].delta_weight(t).detach()
            assert float((new - old).norm() / old.norm()) == pytest.approx(c, rel=1e-8, abs=1e-14)
    for t in ("a", "b"):  # old tasks' outputs moved, as the report says they would
        assert float((after[t] - before[t]).norm() / before[t].norm()) > 1e-4
    assert "consolidation after 'c': k = 3" in str(report)


def test_learner_call_order_and_names():
    learner = ContinualLearner(mlp(), "share", target_modules="all-linear", k=4, p=2)
    with pytest.raises(ValueError, match="no task is in progress"):
        learner.end_task("a")
    learner.begin_task("a")
    with pytest.raises(ValueError, match="task 'a' is in progress"):
        learner.begin_task("b")
    with pytest.raises(ValueError, match="task 'a' is in progress, not 'b'"):
        learner.end_task("b")
    learner.end_task("a")
    with pytest.raises(ValueError, match="task 'a' already exists"):
        learner.begin_task("a")
    with pytest.raises(ValueError, match="invalid task name"):
        learner.begin_task("a.b")
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        learner.set_task("zz")
    assert learner.tasks == ["a"]
    zero = learner.extra_loss()
    assert zero.shape == () and float(zero) == 0.0


def test_trainable_parameters_are_the_task_in_progress():
    learner = ContinualLearner(mlp(), "share", target_modules=["0", "2"], k=4, p=2, r=3, phi=2)
    learner.begin_task("a")  # the LoRA phase: lora_A, lora_B per layer
    assert {tuple(p.shape) for p in learner.trainable_parameters()} == {(3, 10), (24, 3), (3, 24), (6, 3)}
    learner.end_task("a")
    learner.begin_task("b")  # coefficients plus temporary directions
    names = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert names == {
        f"{i}.{n}" for i in (0, 2) for n in ("eps_a.b", "eps_b.b", "U_tmp", "V_tmp", "eps_a_tmp", "eps_b_tmp")
    }
    assert len(learner.trainable_parameters()) == 12


def test_learner_on_an_already_wrapped_model():
    model = wrap(mlp(), "share", ["0", "2"], k=4, p=2)
    learner = ContinualLearner(model, "share", phi=0)
    assert learner.config.k == 4 and learner.config.phi == 0 and model.continual_config.phi == 0
    learner.begin_task("a")
    learner.end_task("a")
    learner.begin_task("b")
    assert model[0].U_tmp is None  # phi = 0: coefficients only
    with pytest.raises(ValueError, match="target_modules is required"):
        ContinualLearner(mlp(), "share")
    with pytest.raises(ValueError, match="built with p=2"):
        ContinualLearner(model, "share", p=3)


def test_task_ids_serves_several_tasks_in_one_batch():
    model, learner, data, _, _ = run_three_tasks(k=16)
    x = data["b"][0][:8]
    with torch.no_grad():
        per_task = {}
        for t in learner.tasks:
            learner.set_task(t)
            per_task[t] = model(x)
        learner.set_task(None)
        per_task[None] = model(x)
        names = ["a", "c", None, "b", "b", None, "a", "c"]
        ids = torch.tensor([-1 if n is None else learner.tasks.index(n) for n in names])
        with task_ids(model, ids):
            mixed = model(x)
        assert torch.equal(model(x), per_task[None])  # hooks removed
    for i, n in enumerate(names):
        assert torch.allclose(mixed[i], per_task[n][i], rtol=0, atol=1e-12), i


def test_adapter_stats_through_the_learner_config():
    learner = ContinualLearner(mlp(), "share", target_modules=["0", "2"], k=4, p=2, r=5, phi=0)
    st = adapter_stats(learner.model)
    assert st.lora_rank == 5 and st.trainable_per_task == st.stored_per_task == 2 * (2 * 4 * 2)


# ----------------------------------------------------------------------------- the method interface


class PerTaskLoRALinear(nn.Module):
    """A minimal second method: an independent rank-1 LoRA per task."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.tasks, self.active = [], None

    @classmethod
    def from_linear(cls, linear):
        return cls(linear)

    def add_task(self, name):
        self.A[name] = nn.Parameter(torch.randn(1, self.in_features))
        self.B[name] = nn.Parameter(torch.zeros(self.out_features, 1))
        self.tasks.append(name)

    def task_parameters(self, name):
        return [self.A[name], self.B[name]]

    def set_task(self, name):
        self.active = name
        for p in list(self.A.values()) + list(self.B.values()):
            p.requires_grad_(False)
        if name is not None:
            for p in self.task_parameters(name):
                p.requires_grad_(True)

    def forward(self, x):
        y = self.base_layer(x)
        return y if self.active is None else y + x @ self.A[self.active].t() @ self.B[self.active].t()


@dataclass
class PerTaskLoRAConfig:
    r: int = 1


@register_method
class PerTaskLoRA(Method):
    name = "test-per-task-lora"
    layer_cls = PerTaskLoRALinear
    config_cls = PerTaskLoRAConfig

    @classmethod
    def layer_kwargs(cls, config):
        return {}

    @classmethod
    def param_counts(cls, d_in, d_out, config, layer=None):
        return ParamCounts(d_in + d_out, d_in + d_out, 0)

    def begin_task(self, name, batches=None):
        self.seen = list(batches or [])
        for layer in self.layers.values():
            layer.add_task(name)
            layer.set_task(name)

    def end_task(self, name, batches=None):
        return f"ended {name}"

    def extra_loss(self):
        return sum(p.square().sum() for p in self.trainable_parameters())


def test_a_new_method_plugs_into_the_same_five_calls():
    assert get_method("test-per-task-lora") is PerTaskLoRA
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    learner = ContinualLearner(model, "test-per-task-lora", target_modules="all-linear")
    learner.begin_task("a", batches=[torch.randn(2, 4)])
    assert len(learner.method.seen) == 1 and len(learner.trainable_parameters()) == 4
    assert float(learner.extra_loss().detach()) > 0
    assert learner.end_task("a") == "ended a" and learner.reports == ["ended a"]
    learner.set_task(None)
    assert adapter_stats(model).trainable_per_task == (4 + 5) + (5 + 3)
    with pytest.raises(ValueError, match="wrapped with method 'test-per-task-lora', not 'share'"):
        ContinualLearner(model, "share")
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Clash(PerTaskLoRA):
            pass
