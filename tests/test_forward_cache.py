"""The adapter layers' forward cache (share_kernels/nn/_cache.py): cached outputs equal uncached
ones, every way the operands change rebuilds them, and threads never see a mixed entry."""

import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import share_kernels

from share_kernels.continual import ContinualLearner, load_adapters, save_adapters
from share_kernels.nn import InfLoRALinear, PSLoRALinear, ShareLinear, clear_forward_cache
from share_kernels.nn._cache import ForwardCache, forward_cache

F64 = torch.float64


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def share_layer(tasks=("a", "b", "c")):
    layer = ShareLinear.from_linear(nn.Linear(13, 11, dtype=F64), k=4, p=2, scale=0.7)
    for t in tasks:
        layer.add_task(t)
    randomize(layer.parameters())
    return layer


def randomize(params):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p))


def share_ref(layer, name, x):
    """float64 reference from the layer's current tensors, through no cached operand."""
    w = layer.base_layer.weight.to(F64) + layer.delta_weight(name).detach().to(F64)
    return F.linear(x.to(F64), w, layer.base_layer.bias.to(F64))


def sgd_step(params, x, layer):
    """One optimizer step (in-place update, version counters bumped) on ``params``."""
    opt = torch.optim.SGD(list(params), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_calls(monkeypatch, obj, name):
    calls = []
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


# ----------------------------------------------------------------------------- the rule


def test_cache_hits_when_nothing_trains_and_never_while_training(monkeypatch):
    layer = share_layer()
    layer.set_task("b")  # b's coefficients require grad now
    calls = count_calls(monkeypatch, layer, "_factors_in")
    x = torch.randn(5, 13, dtype=F64)
    y1 = layer(x)
    y2 = layer(x)
    assert len(calls) == 2 and y1.requires_grad  # grad mode on + a source requires grad: no cache
    with torch.no_grad():
        y3, y4 = layer(x), layer(x)
    assert len(calls) == 3  # built once, then reused
    with torch.inference_mode():
        y5 = layer(x)
    assert len(calls) == 3
    for y in (y2, y3, y4, y5):
        assert torch.equal(y.detach(), y1.detach())
    assert rel(y3, share_ref(layer, "b", x)) < 1e-12  # (the reference calls _factors_in once)
    assert len(calls) == 4
    # frozen layer (no task trains) with grad mode on: cached, and the gradient reaches x
    for p in layer.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    y6 = layer(xg)
    assert len(calls) == 4
    y6.sum().backward()
    w = layer.base_layer.weight + layer.delta_weight("b")
    assert rel(xg.grad, w.sum(0).expand_as(x)) < 1e-12


def test_value_built_in_inference_mode_serves_an_autograd_forward():
    layer = share_layer()
    layer.set_task("a")
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 13, dtype=F64, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())
    layer(x).sum().backward()  # would fail if the cached C were an inference tensor
    assert x.grad is not None


# ----------------------------------------------------------------------------- invalidation: Share


def test_share_optimizer_step_in_place_edit_and_set_task_rebuild():
    layer = share_layer()
    x = torch.randn(6, 13, dtype=F64)
    layer.set_task("a")
    with torch.no_grad():
        before = layer(x)
    sgd_step(layer.task_parameters("a"), x, layer)
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    assert rel(after, share_ref(layer, "a", x)) < 1e-12
    with torch.no_grad():
        layer.eps_b["a"].mul_(-2.0)  # any in-place edit
        assert rel(layer(x), share_ref(layer, "a", x)) < 1e-12
        layer.set_task("c")
        assert rel(layer(x), share_ref(layer, "c", x)) < 1e-12
        layer.scale = 0.3
        assert rel(layer(x), share_ref(layer, "c", x)) < 1e-12


def test_share_mixed_batch_cores_are_cached_and_rebuilt(monkeypatch):
    layer = share_layer()
    calls = count_calls(monkeypatch, layer, "cores")
    x = torch.randn(6, 13, dtype=F64)
    ids = torch.tensor([0, 1, 2, -1, 1, 0])

    def ref():
        w, b = layer.base_layer.weight, layer.base_layer.bias
        rows = [
            F.linear(x[i], w, b) if t < 0 else share_ref(layer, layer.tasks[t], x[i]) for i, t in enumerate(ids.tolist())
        ]
        return torch.stack(rows)

    with torch.no_grad():
        y1, y2 = layer(x, task_ids=ids), layer(x, task_ids=ids)
    assert len(calls) == 1 and torch.equal(y1, y2) and rel(y1, ref()) < 1e-12
    layer.set_task("b")
    sgd_step(layer.task_parameters("b"), x, layer)  # single-task training, then serve again
    with torch.no_grad():
        y3 = layer(x, task_ids=ids)
    assert len(calls) == 2 and rel(y3, ref()) < 1e-12 and not torch.allclose(y3, y1)
    layer.add_task("d")  # a new task (copy of c's coefficients) extends the stack
    with torch.no_grad():
        y4 = layer(x, task_ids=torch.tensor([3, 3, 3, 3, 3, 3]))
    assert rel(y4, torch.stack([share_ref(layer, "d", x[i]) for i in range(6)])) < 1e-12


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 14, dtype=F64), nn.GELU(), nn.Linear(14, 5, dtype=F64))


def train_share(model, learner, name, x):
    learner.begin_task(name)
    opt = torch.optim.SGD(learner.trainable_parameters(), lr=0.05)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    learner.end_task(name)


def delta_ref(model, x):
    with torch.no_grad():
        h = x
        for m in model:
            if isinstance(m, ShareLinear):
                t = m.active_task
                h = F.linear(h, m.base_layer.weight + (m.delta_weight(t) if t else 0), m.base_layer.bias)
            else:
                h = m(h)
        return h


def test_share_consolidation_and_load_adapters_rebuild(tmp_path):
    model = tiny_mlp()
    learner = ContinualLearner(model, "share", target_modules=["0", "2"], k=4, p=2, r=2, phi=1)
    x = torch.randn(7, 9, dtype=F64)
    train_share(model, learner, "a", x)
    learner.set_task("a")
    with torch.no_grad():
        model(x)  # fills the cache with task a in the first subspace
    train_share(model, learner, "b", x)  # consolidation: new U, V and re-expressed coefficients
    learner.set_task("a")
    with torch.no_grad():
        assert rel(model(x), delta_ref(model, x)) < 1e-12
    save_adapters(model, tmp_path)
    expected = {t: (learner.set_task(t), delta_ref(model, x))[1] for t in ("a", "b")}

    other = tiny_mlp()
    learner2 = ContinualLearner(other, "share", target_modules=["0", "2"], k=4, p=2, r=2, phi=1)
    train_share(other, learner2, "a", 3 * x)
    train_share(other, learner2, "b", 3 * x)
    learner2.set_task("b")
    with torch.no_grad():
        stale = other(x)
    load_adapters(other, tmp_path)
    learner2.set_task("b")
    with torch.no_grad():
        got = other(x)
    assert not torch.allclose(got, stale)
    assert rel(got, expected["b"]) < 1e-12


def test_share_to_dtype_rebuilds():
    layer = share_layer()
    layer.set_task("a")
    x = torch.randn(5, 13, dtype=F64)
    with torch.no_grad():
        layer(x)
        layer.float()
        y = layer(x.float())
    assert y.dtype == torch.float32
    assert rel(y, share_ref(layer, "a", x)) < 1e-5
    with torch.no_grad():  # and back: the float64 values are the float32 ones now, not the first ones
        layer.double()
        assert rel(layer(x), share_ref(layer, "a", x)) < 1e-12


def test_clear_forward_cache_after_a_data_write():
    layer = share_layer()
    layer.set_task("a")
    x = torch.randn(5, 13, dtype=F64)
    with torch.no_grad():
        layer(x)
    layer.eps_b["a"].data.mul_(3.0)  # `.data` has its own version counter: not seen ...
    with torch.no_grad():
        assert rel(layer(x), share_ref(layer, "a", x)) > 1e-3
    clear_forward_cache(layer)  # ... until the cache is cleared
    with torch.no_grad():
        assert rel(layer(x), share_ref(layer, "a", x)) < 1e-12


def test_deepcopy_starts_with_an_empty_cache():
    import copy

    layer = share_layer()
    layer.set_task("a")
    with torch.no_grad():
        layer(torch.randn(2, 13, dtype=F64))
    twin = copy.deepcopy(layer)
    assert forward_cache(layer)._slots and not forward_cache(twin)._slots


# ----------------------------------------------------------------------------- InfLoRA, PS-LoRA


def inflora_ref(layer, name, x):
    w = layer.base_layer.weight + layer.delta_weight(name).to(F64)
    return F.linear(x, w, layer.base_layer.bias)


def test_inflora_branches_cached_and_rebuilt(monkeypatch):
    layer = InfLoRALinear.from_linear(nn.Linear(13, 11, dtype=F64), r=2)
    cat = count_calls(monkeypatch, torch, "cat")
    x = torch.randn(6, 13, dtype=F64)
    for t in ("a", "b"):
        layer.add_task(t, torch.randn(2, 13, dtype=F64))
        layer.set_task(t)
        sgd_step([layer.lora_A[t]], x, layer)  # A starts at zero: train it a little
        layer.finish_task()
    n = len(cat)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert len(cat) == n + 2  # U and C concatenated once, not per forward
    assert torch.equal(y1, y2) and rel(y1, inflora_ref(layer, "b", x)) < 1e-12
    with torch.no_grad():
        layer.set_task("a")
        assert rel(layer(x), inflora_ref(layer, "a", x)) < 1e-12
        layer.set_task("b")
        layer.lora_A["a"].add_(1.0)  # in place
        assert rel(layer(x), inflora_ref(layer, "b", x)) < 1e-12
        layer.fold()
        assert rel(layer(x), inflora_ref(layer, "b", x)) < 1e-10
    layer.add_task("c", torch.randn(2, 13, dtype=F64))
    layer.set_task("c")
    with torch.no_grad():
        layer(x)
    sgd_step([layer.lora_A["c"]], x, layer)
    with torch.no_grad():
        assert rel(layer(x), inflora_ref(layer, "c", x)) < 1e-10


def test_pslora_scaled_B_cached_and_rebuilt():
    layer = PSLoRALinear.from_linear(nn.Linear(13, 11, dtype=F64), r=2, lora_alpha=3.0)
    layer.add_task("a")
    layer.set_task("a")
    x = torch.randn(6, 13, dtype=F64)

    def ref():
        w = layer.base_layer.weight + layer.prev_delta + layer.delta_weight("a")
        return F.linear(x.to(w.dtype), w.detach(), layer.base_layer.bias)

    sgd_step(layer.task_parameters("a"), x, layer)
    with torch.no_grad():
        y1 = layer(x)
        assert rel(y1, ref()) < 1e-12
    sgd_step(layer.task_parameters("a"), x, layer)
    with torch.no_grad():
        y2 = layer(x)
    assert not torch.allclose(y1, y2) and rel(y2, ref()) < 1e-12
    with torch.no_grad():
        layer.to(torch.float32)
        assert rel(layer(x.float()), ref().float()) < 1e-5


# ----------------------------------------------------------------------------- threads


def test_threads_never_see_another_states_entry():
    """Threads serving different tasks through one slot (as per-request task routing does) and
    mixed batches at once: every result is the one its own inputs give."""
    layer = share_layer(tasks=("a", "b", "c", "d"))
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 13, dtype=F64)
    ids = torch.tensor([3, 0, -1, 2])
    with torch.no_grad():
        expected = {t: layer._single_operands(t)[1].clone() for t in layer.tasks}
        multi = layer(x, task_ids=ids).clone()
    errors = []

    def serve(name):
        try:
            with torch.no_grad():
                for _ in range(300):
                    if not torch.equal(layer._single_operands(name)[1], expected[name]):
                        errors.append(name)
                    if not torch.equal(layer(x, task_ids=ids), multi):
                        errors.append("multi")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=serve, args=(t,)) for t in layer.tasks]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


def test_forward_cache_get_rejects_nothing_it_should_keep():
    cache = ForwardCache()
    a = torch.randn(3)
    v1 = cache.get("s", [a], "k", lambda: a * 2)
    assert cache.get("s", [a], "k", lambda: pytest.fail("recomputed")) is v1
    assert torch.equal(cache.get("s", [a], "other", lambda: a * 3), a * 3)  # state change
    b = a.clone()  # same values, another tensor
    assert torch.equal(cache.get("s", [b], "other", lambda: b * 4), b * 4)


# ----------------------------------------------------------------------------- the CPU multi-task path


@pytest.mark.parametrize("per_sequence", [False, True])
def test_multi_task_reference_is_row_parallel_and_equals_the_definition(per_sequence):
    """The row-parallel reference (one batched core product, chunked over rows) against the
    row-by-row definition in float64; k = 200 makes the per-row path use several chunks."""
    from share_kernels.ops.multi_task_linear import multi_task_linear_reference

    k, T = (200, 5) if not per_sequence else (6, 4)
    x = torch.randn(3, 45, 17, dtype=F64)
    W, b = torch.randn(13, 17, dtype=F64), torch.randn(13, dtype=F64)
    U, V = torch.randn(17, k, dtype=F64), torch.randn(13, k, dtype=F64)
    cores = torch.randn(T, k, k, dtype=F64)
    ids = torch.tensor([2, -1, 3]) if per_sequence else torch.randint(-1, T, (3, 45))
    y = multi_task_linear_reference(x, W, b, U, cores, V, ids)
    base = F.linear(x, W, b)
    for i in range(3):
        for j in range(45):
            t = int(ids[i] if per_sequence else ids[i, j])
            if t < 0:
                assert torch.equal(y[i, j], base[i, j])
            else:
                want = base[i, j] + ((x[i, j] @ U) @ cores[t]) @ V.t()
                torch.testing.assert_close(y[i, j], want, rtol=1e-10, atol=1e-10)


def test_compiled_forward_bypasses_the_cache_and_sees_updates():
    layer = share_layer()
    layer.set_task("a")
    x = torch.randn(5, 13, dtype=F64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel(compiled(x), share_ref(layer, "a", x)) < 1e-12
        layer.eps_b["a"].mul_(-1.5)
        assert rel(compiled(x), share_ref(layer, "a", x)) < 1e-12
    assert not forward_cache(layer)._slots


def test_merged_inference_is_one_linear_with_a_cached_merged_weight(monkeypatch):
    from share_kernels.nn import set_merged_inference

    layer = share_layer()
    model = nn.Sequential(layer)
    assert set_merged_inference(model) == 1
    x = torch.randn(6, 13, dtype=F64)
    layer.set_task("a")  # a's coefficients require grad: training, so no merged copy
    y = layer(x)
    assert y.requires_grad and rel(y, share_ref(layer, "a", x)) < 1e-12
    calls = count_calls(monkeypatch, layer, "task_factors")
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    assert len(calls) == 1 and torch.equal(y1, y2) and rel(y1, share_ref(layer, "a", x)) < 1e-12
    sgd_step(layer.task_parameters("a"), x, layer)
    with torch.no_grad():
        assert rel(layer(x), share_ref(layer, "a", x)) < 1e-12
        layer.set_task("b")
        assert rel(layer(x), share_ref(layer, "b", x)) < 1e-12
        ids = torch.tensor([0, 1, 2, -1, 0, 2])  # the mixed-batch path is unchanged
        want = torch.stack([F.linear(x[i], layer.base_layer.weight, layer.base_layer.bias) if t < 0
                            else share_ref(layer, layer.tasks[t], x[i]) for i, t in enumerate(ids.tolist())])
        assert rel(layer(x, task_ids=ids), want) < 1e-12


def test_a_value_cached_under_autocast_is_not_served_outside_it():
    """C computed inside a bf16 autocast region is bf16: outside the region the layer must use an
    fp32 C again (the cache keys on the autocast state), and inside it again the bf16 one."""
    layer = share_layer()
    layer.set_task("a")
    layer.requires_grad_(False)
    x = torch.randn(4, 13, dtype=torch.float32)
    want = share_ref(layer.double(), "a", x.double())
    layer.float()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
        full = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low2 = layer(x)
    assert low.dtype == low2.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert rel(full, want) < 1e-5 < rel(low, want)
    assert torch.equal(low, low2)


def test_compiled_model_follows_task_ids_blocks():
    """torch.compile of a Share model: outside any task_ids block one graph (fullgraph works); inside
    a block the routed ids are used, never a graph traced without them."""
    torch._dynamo.reset()
    model = share_kernels.wrap(nn.Sequential(nn.Linear(13, 11, dtype=F64)), "share", ["0"], k=4, p=2)
    layer = model[0]
    for t in ("a", "b", "c"):
        layer.add_task(t)
    randomize(layer.parameters())
    layer.set_task("a")
    layer.requires_grad_(False)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(3, 13, dtype=F64)
    ids = ["b", "__base__", "c"]
    with torch.no_grad():
        plain = compiled(x)
        with share_kernels.task_ids(model, ids):
            routed = compiled(x)
            eager_routed = model(x)
        after = compiled(x)
    assert rel(plain, share_ref(layer, "a", x)) < 1e-12 and torch.equal(after, plain)
    assert torch.equal(routed, eager_routed)
    assert rel(routed[0], share_ref(layer, "b", x[:1])[0]) < 1e-12
    assert torch.equal(routed[1], F.linear(x[1], layer.base_layer.weight, layer.base_layer.bias))


def test_task_ids_refused_while_a_task_is_merged():
    """After merge_adapter the base weight holds the task: a task_ids block would add updates
    on top of it (and give '__base__' rows the merged weight), so the forward refuses."""
    model = share_kernels.wrap(nn.Sequential(nn.Linear(13, 11, dtype=F64)), "share", ["0"], k=4, p=2)
    for t in ("a", "b"):
        model[0].add_task(t)
    randomize(model[0].parameters())
    model.requires_grad_(False)
    share_kernels.merge_adapter(model, "a")
    x = torch.randn(2, 13, dtype=F64)
    with torch.no_grad(), share_kernels.task_ids(model, ["a", "__base__"]):
        with pytest.raises(RuntimeError, match="merged"):
            model(x)
    share_kernels.unmerge_adapter(model)
    with torch.no_grad(), share_kernels.task_ids(model, ["a", "__base__"]):
        y = model(x)
    assert rel(y[0], share_ref(model[0], "a", x[:1])[0]) < 1e-12


def test_merged_inference_of_a_conv1d_layer_is_built_once(monkeypatch):
    """A Conv1D base (weight (d_in, d_out)): the merged weight is cached like nn.Linear's, not
    rebuilt every forward (its transposed view is a new object each call)."""
    from transformers.pytorch_utils import Conv1D

    from share_kernels.nn import set_merged_inference

    layer = ShareLinear(Conv1D(11, 13).double(), k=4, p=2, scale=0.7)
    layer.add_task("a")
    randomize(layer.parameters())
    layer.set_task("a")
    layer.requires_grad_(False)
    set_merged_inference(nn.Sequential(layer))
    calls = count_calls(monkeypatch, layer, "task_factors")
    x = torch.randn(4, 13, dtype=F64)
    with torch.no_grad():
        ys = [layer(x) for _ in range(4)]
    assert len(calls) == 1 and all(torch.equal(y, ys[0]) for y in ys)
    want = F.linear(x, layer.base_weight() + layer.delta_weight("a"), layer.base_layer.bias)
    assert rel(ys[0], want) < 1e-12
