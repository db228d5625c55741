"""InfLoRA's threshold schedule and saturation warning; PS-LoRA's stability loss and magnitude
merge on top of InfLoRA (``method="inflora", stability=...``), against float64 references."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from share_kernels.continual import ContinualLearner, base_state_dict, load_adapters, magnitude_merge, save_adapters
from share_kernels.continual.inflora import InfLoRAConfig, InfLoRASaturationWarning
from share_kernels.continual.pslora import StabilityConfig

F64 = torch.float64


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def naive_stability(D, P, alpha):
    """The stability loss in float64 on the whole update (what the fused op tiles)."""
    D, P = D.to(F64), P.to(F64)
    return ((1 - torch.tanh(alpha * D) * torch.tanh(alpha * P)) * D.square()).sum()


# ----------------------------------------------------------------- threshold schedule, saturation


def test_threshold_schedule_runs_from_lambda_b_to_lambda_e():
    c = InfLoRAConfig(threshold=0.9, threshold_end=0.96, total_tasks=4)
    assert [c.threshold_at(t) for t in (0, 2, 4, 9)] == pytest.approx([0.9, 0.93, 0.96, 0.96])
    assert InfLoRAConfig(threshold=0.95, total_tasks=10).threshold_at(5) == pytest.approx(0.975)  # λ_e = 1
    for bad in [dict(threshold_end=0.0), dict(threshold_end=1.01), dict(threshold_end=True),
                dict(threshold=0.97, threshold_end=0.96)]:  # fmt: skip
        with pytest.raises(ValueError, match="threshold"):
            InfLoRAConfig(**bad)


def run_task(model, learner, name, xs, steps=3):
    learner.begin_task(name, xs)
    opt = torch.optim.SGD(learner.trainable_parameters(), lr=0.1)
    for _ in range(steps):
        loss = sum(model(x).square().mean() for x in xs) + learner.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return learner.end_task(name, xs)


def test_saturated_layer_warns_once_naming_it_and_the_report_says_so():
    d = 6
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4))
    learner = ContinualLearner(model, "inflora", target_modules=["0", "2"], r=2, threshold=1.0, total_tasks=1)
    xs = [torch.randn(16, d) for _ in range(2)]  # full-rank inputs: ε = 1 protects all of R^6 and R^5
    seen = []
    for t in range(3):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            report = run_task(model, learner, f"t{t}", xs)
        seen.append([w for w in rec if issubclass(w.category, InfLoRASaturationWarning)])
        if t == 0:
            assert not seen[0] and report.directions == {"0": 2, "2": 2} and not report.saturated
    # once the memory covers the input space, the next task gets zero rows in B_t everywhere
    assert len(seen[-1]) == 1, [str(w.message) for w in seen[-1]]
    msg = str(seen[-1][0].message)
    assert "saturated" in msg and "0: 0/2 directions, protected 6/6" in msg and "2: 0/2 directions, protected 5/5" in msg
    assert "total_tasks" in msg
    assert report.saturated == ["0", "2"] and "saturated: 0, 2" in str(report)
    layer = model[0]
    assert not layer.lora_B["t2"].any() and layer.memory_dim == d


def test_no_warning_while_the_free_space_lasts():
    model = nn.Sequential(nn.Linear(32, 8))
    learner = ContinualLearner(model, "inflora", target_modules=["0"], r=2, threshold=0.6, total_tasks=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfLoRASaturationWarning)
        for t in range(3):
            report = run_task(model, learner, f"t{t}", [torch.randn(40, 32)])
            assert report.directions == {"0": 2} and "fewer than" not in str(report)


# ----------------------------------------------------------------- PS-LoRA on InfLoRA


def test_stability_config_coercion_and_errors():
    assert InfLoRAConfig().stability is None and InfLoRAConfig().merge == "sum"
    c = InfLoRAConfig(stability=True)
    assert c.stability == StabilityConfig() and c.merge == "magnitude"
    c = InfLoRAConfig(stability={"lam": 0.5, "merge": False})
    assert c.stability.lam == 0.5 and c.merge == "sum"
    with pytest.raises(ValueError, match="unknown stability option"):
        InfLoRAConfig(stability={"beta": 1})
    with pytest.raises(ValueError, match="lam"):
        InfLoRAConfig(stability={"lam": -1.0})
    with pytest.raises(TypeError, match="stability"):
        InfLoRAConfig(stability=0.1)


@pytest.mark.parametrize("merge", [True, False])
def test_stability_loss_on_A_t_matches_float64_reference(merge):
    torch.manual_seed(3)
    d_in, d_out, r, lam, alpha = 19, 11, 3, 0.7, 4.0
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, 9))
    learner = ContinualLearner(
        model, "inflora", target_modules=["0", "2"], r=r, threshold=0.7, total_tasks=3,
        stability={"lam": lam, "alpha": alpha, "merge": merge},
    )  # fmt: skip
    xs = [torch.randn(24, d_in)]
    layers = learner.layers
    # the first task trains against an empty history: the loss is plain L2 on the update
    learner.begin_task("t0", xs)
    for layer in layers.values():
        layer.lora_A["t0"].data.normal_()
    want = sum(naive_stability(l.lora_A["t0"] @ l.lora_B["t0"], torch.zeros(l.out_features, l.in_features), alpha)
               for l in layers.values())  # fmt: skip
    assert rel(learner.extra_loss(), lam * want) < 1e-5
    report = learner.end_task("t0", xs)
    assert set(report.replaced) == ({"0", "2"} if merge else set())
    # second task: the loss's operand is the accumulated update of task 0 (merged into the fold)
    learner.begin_task("t1", xs)
    A = {n: torch.randn_like(l.lora_A["t1"]) for n, l in layers.items()}
    for n, l in layers.items():
        l.lora_A["t1"].data.copy_(A[n])
    loss = learner.extra_loss()
    loss.backward()
    ref = torch.zeros((), dtype=F64)
    A64 = {n: A[n].to(F64).requires_grad_(True) for n in A}
    for n, l in layers.items():
        P = (l.lora_A["t0"] @ l.lora_B["t0"]).to(F64)  # one task: the sum and the merge agree
        assert rel(l.folded_delta, P) < 1e-6
        ref = ref + lam * naive_stability(A64[n] @ l.lora_B["t1"].to(F64), P, alpha)
    ref.backward()
    assert rel(loss, ref) < 1e-5
    for n, l in layers.items():
        assert rel(l.lora_A["t1"].grad, A64[n].grad) < 1e-5
        assert l.lora_B["t1"].grad is None  # B_t stays frozen


def test_magnitude_merge_history_and_forward_match_float64_reference(tmp_path):
    torch.manual_seed(4)
    d_in, d_out = 17, 10
    model = nn.Sequential(nn.Linear(d_in, d_out))
    learner = ContinualLearner(model, "inflora", target_modules=["0"], r=2, threshold=0.5, total_tasks=3,
                               stability={"lam": 0.1, "alpha": 10.0})  # fmt: skip
    layer = model[0]
    assert layer.merge == "magnitude"
    P = torch.zeros(d_out, d_in, dtype=F64)
    x = torch.randn(5, 3, d_in)
    for t in range(3):
        xs = [torch.randn(30, d_in)]
        report = run_task(model, learner, f"t{t}", xs, steps=4)
        D = (layer.lora_A[f"t{t}"] @ layer.lora_B[f"t{t}"]).to(F64)
        assert layer.lora_A[f"t{t}"].abs().sum() > 0
        taken = (D.abs() > P.abs()).double().mean()
        P = magnitude_merge(P, D)
        assert rel(layer.folded_delta, P) < 1e-6 and report.replaced["0"] == pytest.approx(float(taken), abs=1e-3)
    assert "magnitude merge took" in str(report)
    want = F.linear(x.to(F64), layer.base_layer.weight.to(F64) + P, layer.base_layer.bias.to(F64))
    for t in ("t0", "t1", "t2"):  # every finished task runs the one merged model
        learner.set_task(t)
        assert rel(model(x), want) < 1e-5
        assert rel(layer.delta_weight(), P) < 1e-6
    out = model(x)
    save_adapters(model, str(tmp_path))
    fresh = nn.Sequential(nn.Linear(d_in, d_out))
    fresh.load_state_dict(base_state_dict(model))  # the base weights, under the plain names
    load_adapters(fresh, str(tmp_path))
    assert fresh[0].merge == "magnitude" and fresh[0].n_folded == 3
    assert fresh.continual_config.stability == StabilityConfig(lam=0.1, alpha=10.0)
    fresh[0].set_task("t2")
    assert torch.equal(fresh(x), out)


def test_stability_off_keeps_plain_inflora():
    torch.manual_seed(5)
    x = torch.randn(30, 12)
    outs = []
    for stab in (None, {"lam": 0.0, "merge": False}):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(12, 7))
        learner = ContinualLearner(model, "inflora", target_modules=["0"], r=2, threshold=0.8, stability=stab)
        for t in range(2):
            run_task(model, learner, f"t{t}", [x + t])
        assert float(learner.extra_loss()) == 0.0
        outs.append(model(x))
    # lam = 0 without the merge: the same training, only folded (sum) instead of two branches
    assert rel(outs[1], outs[0]) < 1e-5
