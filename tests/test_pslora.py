"""PS-LoRA: the magnitude merge, PSLoRALinear (forward, stability loss, merge), the continual loop
with method="pslora", save / load and adapter_stats."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import share_kernels
from share_kernels.continual import (
    ContinualLearner,
    PSLoRAConfig,
    adapter_stats,
    load_adapters,
    magnitude_merge,
    save_adapters,
    wrap,
)
from share_kernels.continual.pslora import MergeReport, merge_layer
from share_kernels.nn import PSLoRALinear
from tests.test_stability_loss import naive64

F64 = torch.float64


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- merge rule


def test_magnitude_merge_hand_made_cases():
    prev = torch.tensor([[1.0, -2.0, 3.0, 0.0, -0.5, 2.0]])
    new = torch.tensor([[-4.0, 1.0, -3.0, 0.0, 0.0, -2.5]])
    out = magnitude_merge(prev, new)
    # opposite signs, larger |new|: new wins with its sign; smaller |new|: history stays;
    # tie (+3 vs -3): history stays; both zero; zero update never overwrites; -2.5 beats 2.0.
    assert out.tolist() == [[-4.0, -2.0, 3.0, 0.0, -0.5, -2.5]]
    assert magnitude_merge(prev, prev.neg()).tolist() == prev.tolist()  # all ties: history
    tiny = torch.tensor([[0.0, -1e-30], [1e-30, 0.0]])
    assert torch.equal(magnitude_merge(torch.zeros(2, 2), tiny), tiny)  # any nonzero beats an empty history
    with pytest.raises(ValueError, match=r"one shape; got \(1, 6\) and \(6, 1\)"):
        magnitude_merge(prev, new.t())


def test_magnitude_merge_random_against_definition():
    prev, new = torch.randn(37, 23, dtype=F64), torch.randn(37, 23, dtype=F64)
    out = magnitude_merge(prev, new)
    rows = zip(prev.tolist(), new.tolist())
    expect = torch.tensor([[n if abs(n) > abs(p) else p for p, n in zip(pr, nr)] for pr, nr in rows], dtype=F64)
    assert torch.equal(out, expect)
    assert torch.all(out.abs() >= prev.abs()) and torch.all(out.abs() >= new.abs())


# ----------------------------------------------------------------------------- layer


def make_layer(d_in=29, d_out=23, r=4, lora_alpha=8.0, alpha=5.0, lam=0.3, dtype=F64, bias=True):
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    return PSLoRALinear.from_linear(lin, r=r, lora_alpha=lora_alpha, alpha=alpha, lam=lam)


def fill_task(layer, name, scale_b=0.3):
    """A random B for the training task (B starts at 0), so its update is not zero."""
    with torch.no_grad():
        layer.lora_B[name].copy_(torch.randn_like(layer.lora_B[name]) * scale_b)


def test_new_task_is_an_exact_noop_and_peft_init():
    layer = make_layer()
    x = torch.randn(3, 5, 29, dtype=F64)
    base = layer.base_layer(x)
    layer.add_task("t0")
    layer.set_task("t0")
    assert torch.count_nonzero(layer.lora_B["t0"]) == 0 and torch.count_nonzero(layer.lora_A["t0"]) > 0
    bound = 1 / 29**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = d_in
    assert layer.lora_A["t0"].abs().max() <= bound
    assert torch.equal(layer(x), base)
    assert layer.scale == 2.0 and [p.shape for p in layer.task_parameters("t0")] == [(4, 29), (23, 4)]
    assert all(p.requires_grad for p in layer.task_parameters("t0")) and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_base_plus_history_plus_scaled_lora(bias):
    layer = make_layer(bias=bias)
    layer.add_task("t0")
    layer.set_task("t0")
    fill_task(layer, "t0")
    P = torch.randn(23, 29, dtype=F64) * 0.1
    layer.set_history(P)
    x = torch.randn(2, 7, 29, dtype=F64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["t0"], layer.lora_B["t0"]
    ref = F.linear(x, W + P, b) + layer.scale * (x @ A.t()) @ B.t()
    y = layer(x)
    assert rel_err(y, ref.detach()) < 1e-12
    layer.set_task(None)
    assert torch.equal(layer(x), layer.base_layer(x))
    # the forward trains A and B only
    layer.set_task("t0")
    layer(x).sum().backward()
    assert A.grad is not None and B.grad is not None and W.grad is None


def test_layer_stability_loss_puts_the_scale_on_B_and_lam_in_extra_loss():
    layer = make_layer(lam=0.3, alpha=5.0)
    layer.add_task("t0")
    layer.set_task("t0")
    fill_task(layer, "t0")
    P = torch.randn(23, 29, dtype=F64) * 0.2
    layer.set_history(P)
    A, B = layer.lora_A["t0"], layer.lora_B["t0"]
    loss = layer.extra_loss()
    a, b = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = 0.3 * naive64(a, layer.scale * b, P, 5.0)
    ref.backward()
    loss.backward()
    assert rel_err(loss, ref.detach()) < 1e-12
    assert rel_err(A.grad, a.grad) < 1e-12 and rel_err(B.grad, b.grad) < 1e-12


def test_end_task_layer_equals_base_plus_merged_delta():
    layer = make_layer()
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 29, dtype=F64)
    merged_ref = torch.zeros(23, 29, dtype=F64)
    for t in ("t0", "t1", "t2"):
        layer.add_task(t)
        layer.set_task(t)
        fill_task(layer, t)
        delta = layer.scale * layer.lora_B[t].detach() @ layer.lora_A[t].detach()
        merged_ref = torch.where(delta.abs() > merged_ref.abs(), delta, merged_ref)
        frac = merge_layer(layer)
        assert 0.0 < frac <= 1.0
        assert torch.equal(layer.prev_delta, merged_ref)
        # every finished task runs the merged model; the base weight is untouched
        for name in layer.tasks:
            layer.set_task(name)
            assert rel_err(layer(x), F.linear(x, W0 + merged_ref, layer.base_layer.bias).detach()) < 1e-12
        assert torch.equal(layer.base_layer.weight, W0)
        assert layer.training_task is None and not any(p.requires_grad for p in layer.lora_B.values())
    with pytest.raises(ValueError, match="no task in training"):
        merge_layer(layer)


def test_state_dict_round_trip_rebuilds_the_merged_copy():
    layer = make_layer()
    layer.add_task("t0")
    fill_task(layer, "t0")
    merge_layer(layer)
    other = make_layer()
    other.load_state_dict(layer.state_dict(), strict=False)  # lora_* keys: other has no tasks
    other.base_layer.load_state_dict(layer.base_layer.state_dict())
    other.add_task("t0")
    other.training_task = None
    other.set_task("t0")
    layer.set_task("t0")
    x = torch.randn(3, 29, dtype=F64)
    assert "merged_weight" not in layer.state_dict()
    assert torch.equal(other.prev_delta, layer.prev_delta) and torch.allclose(other(x), layer(x), atol=1e-12)


def test_layer_arguments_are_checked():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="r must be a positive int"):
        PSLoRALinear.from_linear(lin, r=0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        PSLoRALinear.from_linear(lin, alpha=-1.0)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
        PSLoRALinear.from_linear(lin, lora_alpha=0.0)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        PSLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    layer = PSLoRALinear.from_linear(lin)
    layer.add_task("a")
    with pytest.raises(ValueError, match="'a' is not merged yet"):
        layer.add_task("b")
    with pytest.raises(ValueError, match=r"prev_delta: expected \(d_out=3, d_in=4\); got \(4, 3\)"):
        layer.set_history(torch.zeros(4, 3))


def test_config_validation():
    assert PSLoRAConfig(r=4, lora_alpha=8).scale == 2.0
    for bad in ({"r": 0}, {"r": 2.0}, {"lora_alpha": 0}, {"alpha": -1}, {"lam": float("inf")}, {"lam": True}):
        with pytest.raises(ValueError, match="PSLoRAConfig"):
            PSLoRAConfig(**bad)


# ----------------------------------------------------------------------------- the continual loop


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 16)
        self.v_proj = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


def tasks_data(n_tasks=2, n=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_tasks):
        x = torch.randn(n, 12, generator=g)
        y = (x @ torch.randn(12, 3, generator=g)).argmax(-1)
        out.append((x, y))
    return out


def train_stream(model, **cfg):
    learner = ContinualLearner(model, method="pslora", target_modules=["q_proj", "v_proj"], **cfg)
    history = []
    for i, (x, y) in enumerate(tasks_data()):
        name = f"task{i}"
        learner.begin_task(name)
        opt = torch.optim.Adam(learner.trainable_parameters(), lr=2e-2)
        first = last = None
        for _ in range(15):
            task_loss = F.cross_entropy(model(x), y)
            loss = task_loss + learner.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = task_loss.item() if first is None else first
            last = task_loss.item()
        report = learner.end_task(name)
        history.append((first, last, report))
    return learner, history


def test_learner_loop_end_to_end():
    model = Tiny()
    base = copy.deepcopy(model)
    learner, history = train_stream(model, r=4, lora_alpha=8.0, alpha=20.0, lam=0.05)
    assert learner.tasks == ["task0", "task1"]
    for first, last, report in history:
        assert last < first  # the task trains through the LoRA
        assert isinstance(report, MergeReport) and set(report.replaced) == {"q_proj", "v_proj"}
        assert all(0.0 < f <= 1.0 for f in report.replaced.values()) and "magnitude merge" in str(report)
    x = torch.randn(5, 12)
    # the merged model: every base weight plus its layer's merged history
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.q_proj.weight += model.q_proj.prev_delta
        ref.v_proj.weight += model.v_proj.prev_delta
    for name in learner.tasks:
        learner.set_task(name)
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    learner.set_task(None)
    assert torch.allclose(model(x), base(x), atol=1e-6)
    assert torch.count_nonzero(model.q_proj.prev_delta) > 0
    # no task in training: the stability loss is 0, nothing is trainable
    assert learner.extra_loss().item() == 0.0 and learner.trainable_parameters() == []


def test_extra_loss_sums_layers_times_lam():
    model = Tiny()
    learner = ContinualLearner(model, method="pslora", target_modules=["q_proj", "v_proj"], r=2, lam=0.25, alpha=7.0)
    learner.begin_task("a")
    for layer in learner.layers.values():
        fill_task(layer, "a")
        layer.set_history(torch.randn_like(layer.prev_delta) * 0.1)
    got = learner.extra_loss()
    want = 0.25 * sum(
        naive64(l.lora_A["a"], l.scale * l.lora_B["a"], l.prev_delta, 7.0) for l in learner.layers.values()
    )
    assert got.dtype == torch.float32 and rel_err(got, want.detach()) < 1e-5
    # a learner built with other loss settings pushes them into the layers
    learner2 = ContinualLearner(model, method="pslora", lam=0.0)
    assert learner2.extra_loss().item() == 0.0 and model.q_proj.lam == 0.0
    with pytest.raises(ValueError, match="r=2, lora_alpha=8.0; the config says r=3"):
        ContinualLearner(model, method="pslora", r=3)


def test_save_load_round_trip(tmp_path):
    model = Tiny()
    base_state = copy.deepcopy(model.state_dict())
    learner, _ = train_stream(model, r=4, alpha=20.0, lam=0.05)
    save_adapters(model, str(tmp_path))
    fresh = Tiny()
    fresh.load_state_dict(base_state)
    assert load_adapters(fresh, str(tmp_path)) == ["task0", "task1"]
    x = torch.randn(6, 12)
    for name in ("task1", None):
        learner.set_task(name)
        ContinualLearner(fresh, method="pslora").set_task(name)
        assert torch.equal(model(x), fresh(x))
    for n in ("q_proj", "v_proj"):
        a, b = getattr(model, n), getattr(fresh, n)
        assert torch.equal(a.prev_delta, b.prev_delta) and a.adapter_config() == b.adapter_config()
        for t in ("task0", "task1"):
            assert torch.equal(a.lora_A[t], b.lora_A[t]) and torch.equal(a.lora_B[t], b.lora_B[t])
    assert fresh.continual_config == learner.config
    # the loaded model continues the stream: a third task merges into the loaded history
    l2 = ContinualLearner(fresh, method="pslora")
    l2.begin_task("task2")
    fill_task(fresh.q_proj, "task2")
    before = fresh.q_proj.prev_delta.clone()
    l2.end_task("task2")
    assert not torch.equal(fresh.q_proj.prev_delta, before)
    # a task in training is not saved
    l2.begin_task("task3")
    with pytest.raises(ValueError, match="'task3' is not merged yet"):
        save_adapters(fresh, str(tmp_path / "mid"))


def test_load_refuses_shapes_that_do_not_fit(tmp_path):
    model = Tiny()
    train_stream(model, r=4)
    save_adapters(model, str(tmp_path))
    other = Tiny()
    wrap(other, "pslora", ["q_proj", "v_proj"], r=2)
    with pytest.raises(ValueError, match="saved with"):
        load_adapters(other, str(tmp_path))


def test_adapter_stats():
    model = Tiny()
    wrap(model, "pslora", ["q_proj", "v_proj"], r=4)
    stats = adapter_stats(model)
    assert stats.method == "pslora" and stats.layers == 2
    per_task = 4 * (12 + 16) + 4 * (16 + 12)
    assert stats.trainable_per_task == per_task == stats.stored_per_task == stats.lora_per_task
    assert stats.shared == 12 * 16 + 16 * 12
    assert stats.bytes_per_param == 4


def test_top_level_exports():
    assert share_kernels.PSLoRALinear is PSLoRALinear and share_kernels.PSLoRAConfig is PSLoRAConfig
    assert callable(share_kernels.stability_loss) and callable(share_kernels.stability_loss_reference)
