"""InfLoRA: the layer (branches, fold, save / load), the DualGPM memory (energy accounting against a
float64 reference of the official rule, the d/2 switch, the retain-mode shrink), B_t's design, the
interference bound, and the method through the continual-learning API."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import share_kernels.nn.inflora_linear as inflora_linear_mod
from share_kernels.continual import (
    ContinualLearner,
    DualGPM,
    InfLoRAConfig,
    InfLoRAMethod,
    adapter_stats,
    load_adapters,
    save_adapters,
)
from share_kernels.continual.inflora import design_rows, input_covariances, project_all
from share_kernels.nn import InfLoRALinear
from share_kernels.nn.share_linear import random_orthonormal

F64 = torch.float64


def orthonormal(d, k, dtype=torch.float32):
    return random_orthonormal(d, k, like=torch.zeros(1)).to(dtype)


def spectrum_cov(d, eig, dtype=torch.float32):
    """(d, d) PSD with eigenvalues ``eig`` (padded with zeros) in a random basis."""
    Q = orthonormal(d, d, F64)
    e = torch.zeros(d, dtype=F64)
    e[: len(eig)] = torch.as_tensor(eig, dtype=F64)
    return ((Q * e) @ Q.t()).to(dtype)


def layer_with_tasks(d_in=13, d_out=7, r=3, n=3, bias=True, dtype=torch.float32):
    layer = InfLoRALinear.from_linear(nn.Linear(d_in, d_out, bias=bias).to(dtype), r=r)
    for t in range(n):
        layer.add_task(f"t{t}", orthonormal(d_in, r).t() * layer.scale)
        layer.lora_A[f"t{t}"].data.normal_()
        layer.finish_task()
    return layer


def forward_reference(layer, x, upto):
    """float64: ``x Wᵀ + b + Σ_{i ≤ upto} x B_iᵀ A_iᵀ``."""
    W = layer.base_layer.weight.to(F64)
    y = x.to(F64) @ W.t()
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.to(F64)
    for t in layer.tasks[: layer.tasks.index(upto) + 1]:
        y = y + x.to(F64) @ layer.lora_B[t].detach().to(F64).t() @ layer.lora_A[t].detach().to(F64).t()
    return y


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("bias,r", [(True, 3), (False, 1)])
def test_forward_is_one_lowrank_linear_call_over_all_branches(monkeypatch, bias, r):
    layer = layer_with_tasks(bias=bias, r=r)
    x = torch.randn(4, 13, 5).transpose(1, 2)  # (4, 5, 13), non-contiguous
    calls = []
    real = inflora_linear_mod.lowrank_linear
    monkeypatch.setattr(inflora_linear_mod, "lowrank_linear", lambda *a: calls.append(a[3].shape) or real(*a))
    for j, t in enumerate(layer.tasks):
        layer.set_task(t)
        assert rel(layer(x), forward_reference(layer, x, t)) < 1e-5
        assert calls[-1] == (13, r * (j + 1))  # U = [B_1ᵀ ... B_jᵀ]
    assert len(calls) == 3
    layer.set_task(None)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_new_task_is_a_noop_and_only_its_A_trains():
    layer = layer_with_tasks(n=2)
    layer.set_task("t1")
    x = torch.randn(6, 13)
    before = layer(x)
    layer.add_task("t2", orthonormal(13, 3).t())
    layer.set_task("t2")
    assert rel(layer(x), before) < 1e-6  # A = 0 (not bitwise: the low-rank sum runs over more terms)
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.lora_A["t2"]]
    layer(x).square().sum().backward()
    assert layer.lora_A["t2"].grad is not None and layer.lora_B["t2"].grad is None
    layer.finish_task()
    assert not any(p.requires_grad for p in layer.parameters())
    layer.set_task("t0")  # an old task never trains again
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_keeps_the_forward_and_earlier_tasks(dtype):
    layer = layer_with_tasks(n=3, dtype=dtype)
    x = torch.randn(2, 3, 13, dtype=dtype)
    outs = {}
    for t in layer.tasks:
        layer.set_task(t)
        outs[t] = layer(x)
    assert layer.fold() == 3 and layer.n_folded == 3 and layer.fold() == 0
    layer.add_task("t3", orthonormal(13, 3).t().to(dtype))
    layer.lora_A["t3"].data.normal_()
    for t in ["t0", "t1", "t2", "t3"]:
        layer.set_task(t)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel(layer(x), forward_reference(layer, x, t)) < tol
    ref = forward_reference(layer, x, "t2")
    layer.set_task("t2")
    assert rel(layer(x), outs["t2"]) < tol and rel(outs["t2"], ref) < tol
    assert layer.fold() == 0  # t3 is still training


def test_layer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        InfLoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="r must be"):
        InfLoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="scale"):
        InfLoRALinear(nn.Linear(4, 4), scale=float("nan"))
    layer = InfLoRALinear(nn.Linear(9, 4), r=2)
    with pytest.raises(ValueError, match=r"B must be \(r=2, d_in=9\); got \(2, 8\)"):
        layer.add_task("a", torch.zeros(2, 8))
    layer.add_task("a", torch.zeros(2, 9))
    with pytest.raises(ValueError, match="still training"):
        layer.add_task("b", torch.zeros(2, 9))
    with pytest.raises(ValueError, match="invalid task name"):
        InfLoRALinear(nn.Linear(9, 4)).add_task("-x", torch.zeros(10, 9))
    with pytest.raises(ValueError, match=r"basis must be \(d_in=9, m\)"):
        layer.set_memory(torch.zeros(8, 2), False)


# ----------------------------------------------------------------------------- the memory


def official_update(cov, basis, retain, threshold, energy):
    """float64 reference of the official DualGPM rule (liangyanshuo/InfLoRA, update_DualGPM):
    returns (protected basis (d, k), added, captured_before, captured_after)."""
    C = cov.to(F64)
    d = C.shape[0]
    e = (lambda S: S**2) if energy == "covariance" else (lambda S: S)
    total = float(e(torch.linalg.svdvals(C)).sum())
    Mp = DualGPM(d, basis.to(F64), retain).protected_basis()
    P = torch.eye(d, dtype=F64) - Mp @ Mp.t()
    R = P @ C if energy == "covariance" else P @ C @ P
    U, S, _ = torch.linalg.svd(R)
    ratio = e(S) / total
    if Mp.shape[1] == 0:
        r = max(int((torch.cumsum(e(S) / e(S).sum(), 0) < threshold).sum()), 1)
        new = U[:, :r]
        cap_before = 0.0
    elif not retain:
        acc = cap_before = 1 - float(e(S).sum()) / total
        r = 0
        for x in ratio.tolist():
            if acc >= threshold:
                break
            acc, r = acc + x, r + 1
        new = torch.cat([Mp, U[:, :r]], 1)
    else:
        cap_before = 1 - float(e(S).sum()) / total
        acc, r = 1 - cap_before, 0
        for x in ratio.tolist():
            if acc < 1 - threshold:
                break
            acc, r = acc - x, r + 1
        Q = basis.to(F64)  # official: SVD of the complement minus the moved directions
        Ui = torch.linalg.svd(Q - U[:, :r] @ (U[:, :r].t() @ Q)).U[:, : Q.shape[1] - r]
        new = torch.linalg.qr(Ui, mode="complete").Q[:, Ui.shape[1] :]
    Pn = torch.eye(d, dtype=F64) - new @ new.t()
    rest = float(e(torch.linalg.svdvals(Pn @ C if energy == "covariance" else Pn @ C @ Pn)).sum())
    return new, new.shape[1] - Mp.shape[1], cap_before, 1 - rest / total


def same_span(A, B):
    """‖A Aᵀ − B Bᵀ‖ for orthonormal A, B (0 when they span the same space)."""
    A, B = A.to(F64), B.to(F64)
    return float(torch.linalg.matrix_norm(A @ A.t() - B @ B.t(), 2)) if A.shape == B.shape else math.inf


@pytest.mark.parametrize("energy", ["covariance", "data"])
@pytest.mark.parametrize("state", ["empty", "remove", "retain"])
def test_energy_accounting_matches_a_float64_reference(energy, state):
    d = 37
    X = torch.randn(300, d, dtype=F64) * torch.logspace(0, -2, d, dtype=F64)
    cov = (X.t() @ X / 300).float()
    basis = {"empty": torch.zeros(d, 0), "remove": orthonormal(d, 6), "retain": orthonormal(d, 25)}[state]
    mem = DualGPM(d, basis.clone(), retain=state == "retain")
    up = mem.update(cov, 0.93, energy)
    ref, added, cap0, cap1 = official_update(cov, basis, state == "retain", 0.93, energy)
    assert up.added == added > 0
    assert up.memory_after == ref.shape[1] == mem.dim
    assert up.captured_before == pytest.approx(cap0, abs=1e-5)
    assert up.captured_after == pytest.approx(cap1, abs=1e-5)
    assert same_span(mem.protected_basis(), ref) < 1e-3
    assert up.captured_after >= 0.93 or state == "empty"  # later tasks reach ε
    B = mem.basis
    assert torch.allclose(B.t() @ B, torch.eye(B.shape[1]), atol=1e-5)
    assert mem.captured(cov, energy) == pytest.approx(up.captured_after, abs=1e-12)


def test_first_task_keeps_the_directions_under_the_threshold_and_switches_above_d_half():
    d = 20
    cov = spectrum_cov(d, [1.0] * d)  # every direction carries 1/20 of the energy
    mem = DualGPM(d)
    up = mem.update(cov, 0.52, "covariance")  # cumsum 0.05 i < 0.52: i <= 10 = d/2
    assert (up.memory_after, up.mode_after, mem.basis.shape) == (10, "remove", (d, 10))
    mem = DualGPM(d)
    up = mem.update(cov, 0.57, "covariance")  # 11 > d/2: the complement (9 columns) is stored
    assert (up.memory_after, up.mode_after, mem.basis.shape) == (11, "retain", (d, 9))
    assert up.captured_after == pytest.approx(0.55, abs=1e-5)
    prot = mem.protected_basis()  # the complement of the stored complement
    assert torch.allclose(prot.t() @ prot, torch.eye(11), atol=1e-5)
    assert float((mem.basis.t() @ prot).abs().max()) < 1e-5


def test_retain_mode_shrinks_the_complement_inside_itself():
    d = 16
    Q = orthonormal(d, 6)
    mem = DualGPM(d, Q.clone(), retain=True)
    cov = spectrum_cov(d, [3.0, 2.0, 1.0] + [0.1] * 13)
    up = mem.update(cov, 0.9, "covariance")
    assert up.mode_before == up.mode_after == "retain" and up.added > 0
    assert mem.basis.shape == (d, 6 - up.added)
    # the new complement lies inside the old one: protected space only grows
    assert float((mem.basis - Q @ (Q.t() @ mem.basis)).abs().max()) < 1e-5
    assert torch.allclose(mem.basis.t() @ mem.basis, torch.eye(6 - up.added), atol=1e-5)


def test_memory_never_exceeds_d():
    d = 10
    mem = DualGPM(d)
    for t in range(6):
        up = mem.update(spectrum_cov(d, torch.rand(d) + 0.5), 1.0, "covariance")
        assert 0 <= mem.dim <= d and mem.basis.shape[1] <= d / 2
        assert up.memory_after >= up.memory_before
    assert mem.dim == d and mem.retain and mem.basis.shape == (d, 0)
    assert mem.update(spectrum_cov(d, [1.0] * d), 1.0).added == 0
    # nothing is free: B_t gets zero rows rather than directions inside the memory
    B = design_rows(mem.project(spectrum_cov(d, [1.0] * d)), mem, 3, 0.5)
    assert torch.equal(B, torch.zeros(3, d))


def test_design_rows_are_orthonormal_and_outside_the_memory():
    d = 29
    M = orthonormal(d, 8)
    mems = [DualGPM(d, M, False), DualGPM(d, orthonormal(d, 11), True)]
    covs = [spectrum_cov(d, torch.rand(d) + 0.1) for _ in mems]
    grouped = project_all(mems, covs)
    looped = project_all(mems, covs, grouped=False)
    for mem, cov, pc, pl in zip(mems, covs, grouped, looped):
        assert rel(pc, pl) < 1e-6
        B = design_rows(pc, mem, 5, 0.25)
        assert torch.allclose(B @ B.t(), 0.0625 * torch.eye(5), atol=1e-6)
        assert float((B @ mem.protected_basis()).abs().max()) < 1e-5
        # and they are the top-5 left singular vectors of P C
        U = torch.linalg.svd(pc.double()).U[:, :5]
        assert same_span(B.t().double() / 0.25, U) < 1e-4


def test_config_validation():
    assert InfLoRAConfig().scale == pytest.approx(1 / math.sqrt(3))
    c = InfLoRAConfig(threshold=0.95, total_tasks=10)
    assert c.threshold_at(0) == 0.95 and c.threshold_at(5) == pytest.approx(0.975) and c.threshold_at(20) == 1.0
    for bad in [dict(r=0), dict(total_tasks=True), dict(scale=-1.0), dict(threshold=0.0), dict(threshold=1.5),
                dict(energy="sigma4"), dict(fold=1)]:  # fmt: skip
        with pytest.raises(ValueError, match="InfLoRAConfig"):
            InfLoRAConfig(**bad)


# ----------------------------------------------------------------------------- the method


def low_rank_inputs(d, scales, batches=2, shape=(6, 10)):
    """Batches (B, S, d) whose rows lie in a random span of ``len(scales)`` directions."""
    Z = orthonormal(d, len(scales), F64).t()
    s = torch.as_tensor(scales, dtype=F64)
    return [(torch.randn(*shape, len(scales), dtype=F64) * s @ Z).float() for _ in range(batches)]


def train(model, learner, xs, target, steps=60, lr=0.05):
    opt = torch.optim.Adam(learner.trainable_parameters(), lr=lr)
    for _ in range(steps):
        loss = sum((model(x) - target(x)).square().mean() for x in xs)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_learning_task_2_barely_moves_task_1_outputs():
    """The defining property, with a bound derived from the memory's energy accounting.

    The layer is linear and only A_2 trains, so on task-1 inputs X1 (n x d) the output moves by
    ``ΔY = X1 B_2ᵀ A_2ᵀ``. With P = I − M Mᵀ (M the memory after task 1) and ``B_2 = B_2 P + B_2 M Mᵀ``:

        ‖ΔY‖_F ≤ ‖X1 P‖_F ‖A_2 B_2‖_2 + ‖X1 M‖_F ‖B_2 M‖_2 ‖A_2‖_2            (bound 1)

    where the second term is B_2's rounding outside P (≈ 1e-7). ``‖X1 P‖_F² = n tr(P C1 P)``, and
    since P C1 P has rank ≤ d − k, ``tr(P C1 P) ≤ √(d − k) ‖P C1 P‖_F ≤ √(d − k) √(1 − e) ‖C1‖_F``,
    e the captured energy fraction the memory reports (official σ⁴ energy; checked against float64
    to δ = 1e-9, added to 1 − e), which gives bound 2 ≥ bound 1.
    """
    d, d_out, r = 24, 10, 4
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d, d_out))
    learner = ContinualLearner(model, "inflora", target_modules=["0"], r=r, threshold=1.0, total_tasks=2)
    # task 1: rank-4 inputs; with ε = 1 the memory keeps at least every direction but the last,
    # whose σ⁴ share is ~1e-8 (the first-task rule keeps those whose cumulative share stays under ε)
    X1 = low_rank_inputs(d, [1.0, 0.8, 0.6, 1e-2])
    W1 = torch.randn(d_out, d)
    learner.begin_task("t1", X1)
    train(model, learner, X1, lambda x: x @ W1.t())
    report = learner.end_task("t1", X1)
    layer = model[0]
    up = report.layers["0"]
    assert up.memory_after in (3, 4) and up.mode_after == "remove"
    M = torch.linalg.qr(layer.memory.to(F64)).Q  # the memory B_2 is designed against (exactly orthonormal)

    X2 = [torch.randn(6, 10, d) for _ in range(2)]
    W2 = torch.randn(d_out, d)
    snapshot = copy.deepcopy(model)
    learner.begin_task("t2", X2)
    train(model, learner, X2, lambda x: x @ W2.t())
    learner.end_task("t2", X2)

    x1 = torch.cat(X1).reshape(-1, d).to(F64)
    n = x1.shape[0]
    C1 = x1.t() @ x1 / n
    layer.set_task("t1")
    Y1 = forward_reference(layer, x1, "t1")
    A2, B2 = layer.lora_A["t2"].detach().to(F64), layer.lora_B["t2"].detach().to(F64)
    dY = x1 @ B2.t() @ A2.t()
    layer.set_task("t2")
    assert rel(model(x1.float()), Y1 + dY) < 1e-5  # the model's output is what the bound talks about
    moved = float(dY.norm() / Y1.norm())

    k = M.shape[1]
    P = torch.eye(d, dtype=F64) - M @ M.t()
    spec = lambda a: float(torch.linalg.matrix_norm(a, 2))  # noqa: E731
    rounding = float((x1 @ M).norm()) * spec(B2 @ M) * spec(A2)
    bound1 = (float((x1 @ P).norm()) * spec(A2 @ B2) + rounding) / float(Y1.norm())
    # the memory's own accounting, checked here, bounds the energy left outside: 1 − e + δ, δ = 1e-9
    rho4 = float((P @ C1).square().sum() / C1.square().sum())
    assert abs((1 - up.captured_after) - rho4) < 1e-9
    rho4_reported = max(1 - up.captured_after, 0.0) + 1e-9
    tr_bound = math.sqrt(d - k) * math.sqrt(rho4_reported) * float(torch.linalg.matrix_norm(C1))
    bound2 = (math.sqrt(n * tr_bound) * spec(A2 @ B2) + rounding) / float(Y1.norm())
    assert moved <= bound1 * (1 + 1e-9)
    assert bound1 <= bound2 * (1 + 1e-6) + 1e-12
    assert bound2 < 2e-2

    # the same training with an unprojected B_2 (top-r directions of C2 alone) moves task 1 far more
    base = snapshot[0]
    base.set_memory(torch.zeros(d, 0), False)  # an empty memory: design_rows sees C2 itself
    learner2 = ContinualLearner(snapshot, "inflora")
    learner2.begin_task("t2", X2)
    train(snapshot, learner2, X2, lambda x: x @ W2.t())
    dY_free = x1 @ base.lora_B["t2"].detach().to(F64).t() @ base.lora_A["t2"].detach().to(F64).t()
    moved_free = float(dY_free.norm() / Y1.norm())
    dW_free = base.lora_A["t2"].detach().to(F64) @ base.lora_B["t2"].detach().to(F64)
    assert spec(A2 @ B2) > 0.3 * spec(dW_free)  # comparable updates
    assert moved_free > 20 * bound2 and moved_free > 1e4 * moved
    print(f"moved {moved:.3g} <= bound1 {bound1:.3g} <= bound2 {bound2:.3g}; unprojected B: {moved_free:.3g}")


def test_learner_loop_with_padding_masks_and_save_load(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 12)
            self.q = nn.Linear(12, 12)
            self.v = nn.Linear(12, 12)
            self.fc = nn.Linear(12, 5)
            self.drop = nn.Dropout(0.5)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            h = self.drop(self.q(h) * torch.sigmoid(self.v(h)))
            return self.fc(h).mean(1)

    model = Tiny()
    learner = ContinualLearner(model, "inflora", target_modules=["q", "v", "fc"], r=2, total_tasks=3, fold=True)
    assert learner.method.model is model
    outs, reports = {}, []
    probe = torch.randint(0, 30, (3, 7))
    for t in range(3):
        ids = torch.randint(0, 30, (4, 9))
        mask = (torch.arange(9) < torch.randint(3, 10, (4, 1))).long()
        batches = [{"input_ids": ids, "attention_mask": mask}]
        model.train()
        learner.begin_task(f"task{t}", batches)
        assert model.training and model.drop.training  # the covariance pass restored the modes
        assert len(learner.trainable_parameters()) == 3
        opt = torch.optim.AdamW(learner.trainable_parameters(), lr=1e-2)
        for _ in range(5):
            loss = model(ids).square().mean() + learner.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        reports.append(learner.end_task(f"task{t}", batches))
        model.eval()
        outs[f"task{t}"] = model(probe)
    assert all(layer.n_folded == 3 for layer in learner.layers.values())
    assert "DualGPM after 'task2'" in str(reports[-1]) and reports[-1].threshold == pytest.approx(0.95 + 0.05 * 2 / 3)
    # padded positions are not counted: q's covariance is that of the embeddings of unmasked tokens
    ids = torch.randint(0, 30, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    covs = input_covariances(model, learner.layers, [{"input_ids": ids, "attention_mask": mask}])
    rows = model.emb(ids)[mask.bool()].to(F64)
    assert covs["q"][1] == 8 and rel(covs["q"][0], rows.t() @ rows / 8) < 1e-5
    assert covs["q"][0] is covs["v"][0] and covs["fc"][0] is not covs["q"][0]  # q, v: one input
    # so q and v share the work (one design, one memory update) but not their tensors
    q, v = learner.layers["q"], learner.layers["v"]
    assert torch.equal(q.memory, v.memory) and q.memory.data_ptr() != v.memory.data_ptr()
    assert torch.equal(q.lora_B["task2"], v.lora_B["task2"]) and q.lora_B["task2"] is not v.lora_B["task2"]
    mems = [DualGPM(12, orthonormal(12, 2)), DualGPM(12, orthonormal(12, 2)), DualGPM(12, orthonormal(12, 3))]
    mems.append(DualGPM(12, mems[0].basis.clone()))
    c = torch.eye(12)
    assert InfLoRAMethod._representatives([c, c, c, c], mems) == [0, 1, 2, 0]
    assert InfLoRAMethod._representatives([c, c.clone(), c, c], mems) == [0, 1, 2, 0]

    for t in outs:  # an earlier task is still selectable after folding
        learner.set_task(t)
        assert rel(model(probe), outs[t]) < 1e-5
    save_adapters(model, tmp_path)
    fresh = Tiny()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}, strict=False)
    assert load_adapters(fresh, tmp_path) == list(outs)
    fresh.eval()
    for t in outs:
        for layer in fresh.modules():
            if isinstance(layer, InfLoRALinear):
                layer.set_task(t)
        assert rel(fresh(probe), outs[t]) < 1e-5
    for n, layer in learner.layers.items():
        other = fresh.get_submodule(n)
        assert torch.equal(other.memory, layer.memory) and other.memory_retain == layer.memory_retain
        assert torch.equal(other.folded_delta, layer.folded_delta) and other.n_folded == 3
    # learning goes on from the loaded memory
    more = ContinualLearner(fresh, "inflora")
    batches = [torch.randint(0, 30, (2, 5))]
    more.begin_task("task3", batches)
    for n, layer in more.layers.items():
        B = layer.lora_B["task3"].to(F64)
        assert float((B @ DualGPM.from_layer(layer).protected_basis().to(F64)).abs().max()) < 1e-5
    assert more.end_task("task3", batches).layers["q"].memory_after >= reports[-1].layers["q"].memory_after


def test_input_covariances_of_a_chain():
    """Every layer gets its own input's covariance, also when intermediates are freed and their
    memory reused (no_grad), and rows of all leading dims count."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    learner = ContinualLearner(model, "inflora", target_modules=["0", "2", "4"], r=2)
    xs = [torch.randn(3, 5, 8), torch.randn(7, 8)]
    covs = input_covariances(model, learner.layers, xs)
    seen = {n: [] for n in learner.layers}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, 8).to(F64)))
             for n, m in learner.layers.items()]  # fmt: skip
    with torch.no_grad():
        for x in xs:
            model(x)
    for h in hooks:
        h.remove()
    assert len({id(cov) for cov, _ in covs.values()}) == 3
    for n, (cov, count) in covs.items():
        rows = torch.cat(seen[n])
        assert count == 22 and rel(cov, rows.t() @ rows / 22) < 1e-6


@pytest.mark.parametrize("energy", ["covariance", "data"])
def test_grouped_and_per_layer_paths_agree(energy):
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4))
    copies = [copy.deepcopy(model), copy.deepcopy(model)]
    learners = [ContinualLearner(m, "inflora", target_modules=["0", "2", "4"], r=2, threshold=0.9, energy=energy)
                for m in copies]  # fmt: skip
    learners[1].method.grouped = False
    for t in range(4):  # the 9- and 10-wide layers pass d/2 and switch to retain mode
        xs = [torch.randn(3, 4, 10) @ torch.randn(10, 10)]
        reports = []
        for learner in learners:
            learner.begin_task(f"t{t}", xs)
            for layer in learner.layers.values():  # the same "training" in both copies
                g = torch.Generator().manual_seed(t)
                layer.lora_A[f"t{t}"].data.copy_(torch.randn(layer.lora_A[f"t{t}"].shape, generator=g) * 0.1)
            reports.append(learner.end_task(f"t{t}", xs))
        for n in learners[0].layers:
            a, b = learners[0].layers[n], learners[1].layers[n]
            ua, ub = reports[0].layers[n], reports[1].layers[n]
            assert (ua.memory_after, ua.mode_after) == (ub.memory_after, ub.mode_after)
            assert ua.captured_after == pytest.approx(ub.captured_after, abs=1e-5)
            assert same_span(a.memory, b.memory) < 1e-4
            assert same_span(a.lora_B[f"t{t}"].t() / a.scale, b.lora_B[f"t{t}"].t() / b.scale) < 1e-4
    assert any(layer.memory_retain for layer in learners[0].layers.values())


def test_save_load_errors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 6))
    learner = ContinualLearner(model, "inflora", target_modules=["0"], r=2)
    xs = [torch.randn(5, 8)]
    learner.begin_task("a", xs)
    with pytest.raises(ValueError, match="still training"):
        save_adapters(model, tmp_path)
    learner.end_task("a", xs)
    save_adapters(model, tmp_path)
    layer = model[0]
    shared = layer.shared_tensors()
    with pytest.raises(ValueError, match=r"memory: expected \(d_in=8, m\)"):
        layer.load_adapter_state({**shared, "memory": torch.zeros(7, 2)}, {})
    with pytest.raises(ValueError, match=r"task 'a': B: expected \(2, 8\); got \(2, 7\)"):
        layer.load_adapter_state(shared, {"a": {"A": torch.zeros(6, 2), "B": torch.zeros(2, 7)}})
    with pytest.raises(ValueError, match="folded_delta must be present exactly"):
        layer.load_adapter_state({**shared, "n_folded": torch.tensor([1])}, {"a": layer.task_tensors("a")})
    other = nn.Sequential(InfLoRALinear(nn.Linear(8, 6), r=3))
    with pytest.raises(ValueError, match="saved with"):
        load_adapters(other, tmp_path)


def test_method_needs_batches_and_checks_config():
    model = nn.Sequential(nn.Linear(8, 6))
    learner = ContinualLearner(model, "inflora", target_modules=["0"], r=2)
    with pytest.raises(ValueError, match="needs the task's batches at begin_task"):
        learner.begin_task("a")
    with pytest.raises(ValueError, match="received no input rows"):
        learner.begin_task("a", [])
    with pytest.raises(ValueError, match="built with r=2"):
        InfLoRAMethod(learner.layers, InfLoRAConfig(r=3))
    method = InfLoRAMethod(learner.layers, InfLoRAConfig(r=2))
    with pytest.raises(ValueError, match="model is not set"):
        method.begin_task("a", [torch.randn(2, 8)])


def test_adapter_stats():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    learner = ContinualLearner(model, "inflora", target_modules=["0", "2"], r=2, threshold=0.6)
    xs = [torch.randn(20, 8)]
    learner.begin_task("a", xs)
    learner.end_task("a", xs)
    st = adapter_stats(model)
    assert st.method == "inflora" and st.lora_rank == 2 and st.tasks == 1
    assert st.trainable_per_task == 2 * (6 + 4)
    assert st.stored_per_task == 2 * (8 + 6) + 2 * (6 + 4) == st.lora_per_task
    assert st.shared == 8 * model[0].memory.shape[1] + 6 * model[2].memory.shape[1] > 0


def test_bench_suite_quick_runs():
    from share_kernels.bench import inflora as suite

    rows = suite.run(torch.device("cpu"), "quick", echo=lambda *a: None)
    cases = {r["case"] for r in rows}
    assert any("grouped" in c for c in cases) and any("per-layer" in c for c in cases)
    assert all(r["ms"] > 0 for r in rows)


def test_design_rows_keep_rank_r_on_ill_conditioned_inputs():
    """One input direction with 1000x the variance of the others (ViT-like outlier features):
    B_t still gets r orthonormal rows, as the official SVD gives."""
    d, r = 64, 10
    Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q
    lam = torch.ones(d, dtype=torch.float64)
    lam[0] = 1000.0
    C = ((Q * lam) @ Q.t()).float()
    B = design_rows(C, DualGPM(d), r, 1.0)
    assert int((B.norm(dim=1) > 0.5).sum()) == r
    torch.testing.assert_close(B @ B.t(), torch.eye(r), atol=1e-5, rtol=0)
