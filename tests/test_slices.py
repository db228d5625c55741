"""Output slices of a fused projection as targets (InfLoRA on the k and v thirds of a ViT's qkv):
the untouched rows stay the base layer's output bit for bit, the adapted ones match a float64
reference, and the slices save and load."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from share_kernels.continual import ContinualLearner, adapter_stats, load_adapters, save_adapters, set_task, wrap
from share_kernels.nn import InfLoRALinear

F64 = torch.float64


def rel(a, b):
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Attention(nn.Module):
    """timm's ViT attention: one fused ``qkv`` Linear(dim, 3 dim), heads split after it."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim=24, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


DIM = 24
KV = [[DIM, 3 * DIM]]  # k and v thirds of qkv


@pytest.mark.parametrize("slices", [KV, [[2 * DIM, 3 * DIM], [0, DIM]]], ids=["kv", "q+v"])
@pytest.mark.parametrize("bias", [True, False])
def test_untouched_rows_are_bit_identical_and_adapted_rows_match_float64(slices, bias):
    torch.manual_seed(0)
    lin = nn.Linear(DIM, 3 * DIM, bias=bias)
    layer = InfLoRALinear(lin, r=3, out_slices=slices)
    rows = torch.cat([torch.arange(a, b) for a, b in sorted(slices)])
    assert layer.adapted_out == len(rows) and layer.out_slices == sorted(slices)
    for t in ("a", "b"):
        layer.add_task(t, torch.randn(3, DIM))
        layer.lora_A[t].data.normal_()
        layer.finish_task()
    layer.set_task("b")
    x = torch.randn(2, 5, DIM)[:, ::2]  # non-contiguous
    y = layer(x)
    base = lin(x)
    keep = torch.ones(3 * DIM, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(y[..., keep], base[..., keep])
    delta = sum(layer.lora_A[t].to(F64) @ layer.lora_B[t].to(F64) for t in ("a", "b"))
    want = base.to(F64)[..., rows] + x.to(F64) @ delta.t()
    assert rel(y[..., rows], want) < 1e-5
    full = layer.delta_weight()
    assert torch.equal(full[keep], torch.zeros_like(full[keep])) and rel(full[rows], delta) < 1e-6
    layer.fold()
    assert torch.equal(layer(x)[..., keep], base[..., keep]) and rel(layer(x)[..., rows], want) < 1e-5


def test_vit_block_kv_slices_through_the_learner(tmp_path):
    torch.manual_seed(1)
    model = ViT()
    ref = ViT()
    ref.load_state_dict(model.state_dict())
    learner = ContinualLearner(
        model, "inflora", target_modules=["qkv"], r=2, threshold=0.8, total_tasks=2,
        target_slices={"attn.qkv": KV}, stability={"lam": 0.1, "merge": False},
    )  # fmt: skip
    layers = learner.layers
    assert list(layers) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(l.out_slices == KV and l.adapted_out == 2 * DIM for l in layers.values())
    x = torch.randn(4, 6, DIM)
    q_outs = {}
    hooks = [l.register_forward_hook(lambda m, a, o, n=n: q_outs.__setitem__(n, (a[0], o))) for n, l in layers.items()]
    for t in range(2):
        xs = [torch.randn(4, 6, DIM) for _ in range(2)]
        learner.begin_task(f"t{t}", xs)
        assert all(p.shape == (2 * DIM, 2) for p in learner.trainable_parameters())
        opt = torch.optim.SGD(learner.trainable_parameters(), lr=0.5)
        for _ in range(3):
            loss = sum(model(xb).square().mean() for xb in xs) + learner.extra_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        learner.end_task(f"t{t}", xs)
    out = model(x)
    assert rel(out, ref(x)) > 1e-4  # k and v learned something
    for n, (inp, o) in q_outs.items():
        base = layers[n].base_layer(inp)
        assert torch.equal(o[..., :DIM], base[..., :DIM])  # q, bit for bit
        assert not torch.equal(o[..., DIM:], base[..., DIM:])
    for h in hooks:
        h.remove()
    stats = adapter_stats(model)
    assert stats.stored_per_task == 2 * 2 * (DIM + 2 * DIM)  # r (d_in + n_a) per layer, 2 layers
    save_adapters(model, str(tmp_path))
    fresh = ViT()
    fresh.load_state_dict(ref.state_dict())
    load_adapters(fresh, str(tmp_path))
    assert fresh.continual_config.target_slices == {"attn.qkv": KV}
    assert fresh.blocks[0].attn.qkv.out_slices == KV
    learner2 = ContinualLearner(fresh, "inflora")
    learner2.set_task("t1")
    assert torch.equal(fresh(x), out)


def test_bad_slices_raise_clear_errors():
    lin = nn.Linear(8, 12)
    for bad, match in [([[0, 13]], "d_out=12"), ([[4, 4]], "start < stop"), ([[0, 6], [5, 8]], "overlap"),
                       ([], "non-empty"), ("0:4", "non-empty"), ([[0.0, 4]], "ints")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            InfLoRALinear(lin, out_slices=bad)
    for make in (wrap, lambda m, *a, **kw: ContinualLearner(m, *a, **kw)):
        with pytest.raises(ValueError, match=r"\['fc1'\] match no adapted layer"):
            make(ViT(), "inflora", ["qkv"], target_slices={"fc1": KV})
    with pytest.raises(ValueError, match="d_out=72"):
        wrap(ViT(), "inflora", ["qkv"], target_slices={"qkv": [[0, 100]]})
    with pytest.raises(ValueError, match="target_slices"):
        wrap(ViT(), "inflora", ["qkv"], target_slices=[[0, 4]])


def test_pslora_on_kv_slices_of_a_vit_block(tmp_path):
    """The same mechanism for PS-LoRA: history, LoRA and merge over the adapted rows only."""
    from share_kernels.continual import magnitude_merge

    torch.manual_seed(2)
    model = ViT(depth=1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    learner = ContinualLearner(model, "pslora", target_modules=["qkv"], r=2, lam=0.3, alpha=5.0,
                               target_slices={"qkv": KV})  # fmt: skip
    layer = model.blocks[0].attn.qkv
    assert layer.prev_delta.shape == (2 * DIM, DIM) and layer.adapted_out == 2 * DIM
    x = torch.randn(3, 5, DIM)
    P = torch.zeros(2 * DIM, DIM, dtype=F64)
    for t in range(2):
        learner.begin_task(f"t{t}")
        assert learner.trainable_parameters()[1].shape == (2 * DIM, 2)
        layer.lora_B[f"t{t}"].data.normal_()
        D = layer.scale * (layer.lora_B[f"t{t}"].to(F64) @ layer.lora_A[f"t{t}"].to(F64))
        want_loss = 0.3 * ((1 - torch.tanh(5.0 * D) * torch.tanh(5.0 * P)) * D.square()).sum()
        assert rel(learner.extra_loss(), want_loss) < 1e-5
        y, base = layer(x), layer.base_layer(x)
        assert torch.equal(y[..., :DIM], base[..., :DIM])
        want = base.to(F64)[..., DIM:] + x.to(F64) @ (P + D).t()
        assert rel(y[..., DIM:], want) < 1e-5
        learner.end_task(f"t{t}")
        P = magnitude_merge(P, D)
        assert rel(layer.prev_delta, P) < 1e-6
    full = layer.delta_weight("t1")
    assert not full[:DIM].any() and full.shape == (3 * DIM, DIM)
    learner.set_task("t1")
    out = model(x)
    save_adapters(model, str(tmp_path))
    fresh = ViT(depth=1)
    fresh.load_state_dict(base_state)
    load_adapters(fresh, str(tmp_path))
    ContinualLearner(fresh, "pslora").set_task("t1")
    assert torch.equal(fresh(x), out)


def test_gpt2_c_attn_kv_slices_inflora(tmp_path):
    """GPT-2's fused c_attn (a transformers Conv1D, weight (d_in, 3 d)): InfLoRA on its k and v
    thirds. The q third stays bit-identical to the base layer; k and v equal the float64
    reference W + ΔW; the adapters survive a save / load into a fresh model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    learner = ContinualLearner(model, "inflora", ["c_attn"], r=2, target_slices={"c_attn": [[16, 48]]})
    learner.begin_task("t", [{"input_ids": ids}])
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.add_(torch.randn_like(p))
    learner.end_task("t", [{"input_ids": ids}])
    learner.set_task("t")
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = layer(x)
        base = layer.base_layer(x)
        want = F.linear(x.to(F64), layer.base_layer.weight.t().to(F64) + layer.delta_weight("t").to(F64),
                        layer.base_layer.bias.to(F64))
    assert torch.equal(y[..., :16], base[..., :16])
    assert rel(y[..., 16:], want[..., 16:]) < 1e-5 and not torch.equal(y[..., 16:], base[..., 16:])
    save_adapters(model, tmp_path)
    load_adapters(fresh, tmp_path)
    set_task(fresh, "t")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["pslora", "inflora"])
def test_merge_and_unload_of_a_sliced_layer(method):
    """merge_adapter on a layer with output slices folds the update into the adapted rows only:
    merged outputs equal the unmerged task's, the untouched rows of W are unchanged."""
    import share_kernels

    torch.manual_seed(3)
    model = ViT(depth=1)
    kw = dict(r=2, lam=0.3, alpha=5.0) if method == "pslora" else dict(r=2)
    learner = ContinualLearner(model, method, target_modules=["qkv"], target_slices={"qkv": KV}, **kw)
    x = torch.randn(3, 5, DIM)
    learner.begin_task("t0", [x] if method == "inflora" else None)
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.normal_()
    learner.set_task("t0")
    layer = model.blocks[0].attn.qkv
    w_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = model(x)
    share_kernels.merge_adapter(model, "t0")
    assert torch.equal(layer.base_layer.weight[:DIM], w_before[:DIM])
    with torch.no_grad():
        assert rel(model(x), want) < 1e-5
    share_kernels.unmerge_adapter(model)
    assert torch.equal(layer.base_layer.weight, w_before)


@pytest.mark.parametrize("method", ["inflora", "pslora"])
def test_several_slices_gather_the_base_rows_once_and_follow_a_weight_change(method):
    """q + v: the adapted rows of W are gathered once, not every forward, and a change of the
    base weight (in place) is seen by the next forward."""
    from share_kernels.nn import PSLoRALinear
    from share_kernels.nn.common import base_rows

    torch.manual_seed(1)
    slices = [[2 * DIM, 3 * DIM], [0, DIM]]
    lin = nn.Linear(DIM, 3 * DIM, dtype=F64)
    cls = InfLoRALinear if method == "inflora" else PSLoRALinear
    layer = cls(lin, r=3, out_slices=slices)
    layer.add_task("a", torch.randn(3, DIM)) if method == "inflora" else layer.add_task("a")
    layer.set_task("a")
    with torch.no_grad():
        for p in layer.task_parameters("a"):
            p.normal_()
    assert base_rows(layer) is base_rows(layer)
    x = torch.randn(4, DIM, dtype=F64)

    def reference():
        return F.linear(x, lin.weight + layer.delta_weight("a"), lin.bias)

    assert rel(layer(x), reference()) < 1e-12
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the version counter moves
    assert rel(layer(x), reference()) < 1e-12
