"""peft LoRA adapters -> one Share model -> peft adapters, against real peft and transformers.

A tiny Llama is built from a config (no download); adapters are made with ``get_peft_model`` and
``save_pretrained`` with random (non-zero) factors, different ranks, alphas, rslora,
rank/alpha patterns and the legacy ``.bin`` format.
"""
import json
import math
import os
import shutil

import peft
import pytest
import torch
import transformers

import share_kernels
from share_kernels.cli import main
from share_kernels.continual import adapter_layers
from share_kernels.continual.compress import compress, error_curve, skeleton_model
from share_kernels.continual.peft_io import ingest, read_peft_adapter, read_peft_adapters
from tests.conftest import requires_cuda

TARGETS = ["q_proj", "v_proj", "down_proj"]
# name -> LoraConfig kwargs (and how to save)
SPECS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=2, lora_alpha=3, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=16, rank_pattern={"q_proj": 3}, alpha_pattern={"v_proj": 5}),
    "legacy_bin": dict(r=2, lora_alpha=6),
}


def llama_config(hidden=24):
    return transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=hidden,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(llama_config()).state_dict()


def fresh(state, dtype=torch.float32):
    m = transformers.LlamaForCausalLM(llama_config())
    m.load_state_dict(state)
    return m.to(dtype).eval()


def save_lora(state, path, seed, targets=TARGETS, **kw):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(fresh(state), cfg)
    pm.save_pretrained(path, safe_serialization=not path.endswith("legacy_bin"))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_state):
    root = tmp_path_factory.mktemp("peft")
    return {
        name: save_lora(base_state, str(root / name), seed, **kw) for seed, (name, kw) in enumerate(SPECS.items())
    }


def reference_update(path, layer):
    """scaling * B A from the adapter's files, in float64 (independent of the package's reader)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        sd = load_file(st)
    else:
        sd = torch.load(os.path.join(path, "adapter_model.bin"), weights_only=True)
    A = sd[f"base_model.model.{layer}.lora_A.weight"].double()
    B = sd[f"base_model.model.{layer}.lora_B.weight"].double()
    short = layer.rsplit(".", 1)[1]
    r = cfg["rank_pattern"].get(short, cfg["r"])
    alpha = cfg["alpha_pattern"].get(short, cfg["lora_alpha"])
    assert A.shape[0] == r
    s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    return s * B @ A


def peft_logits(state, path, ids):
    model = peft.PeftModel.from_pretrained(fresh(state), path).eval()
    with torch.no_grad():
        return model(ids).logits


def share_logits(model, task, ids):
    for layer in adapter_layers(model).values():
        layer.set_task(task)
    with torch.no_grad():
        return model(ids).logits


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def compressed(base_state, adapters):
    model = fresh(base_state)
    share_kernels.from_peft_adapters(model, list(adapters.values()), k=64)
    return model


# ----------------------------------------------------------------------------- ingest


def test_updates_exact_per_layer_float64(base_state, adapters):
    model = fresh(base_state, torch.float64)
    out = share_kernels.from_peft_adapters(model, list(adapters.values()), k=64)
    assert out is model
    layers = adapter_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in
                                    ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    for name, layer in layers.items():
        assert layer.tasks == list(SPECS)
        assert layer.p == 4  # the largest adapter rank
        assert layer.active_task is None
        for task, path in adapters.items():
            ref = reference_update(path, name)
            assert rel(layer.delta_weight(task), ref) < 1e-12, (name, task)


def test_outputs_match_peft_per_adapter(base_state, adapters, compressed, ids):
    with torch.no_grad():
        base = fresh(base_state)(ids).logits
    for task, path in adapters.items():
        ref = peft_logits(base_state, path, ids)
        assert rel(ref, base) > 1e-2  # the adapter is not a no-op
        assert rel(share_logits(compressed, task, ids) - base, ref - base) < 2e-5, task
    assert torch.equal(share_logits(compressed, None, ids), base)


def test_many_adapters_in_one_batch(base_state, adapters, compressed, ids):
    rows = ["patterns", "__base__", "legacy_bin"]  # one task per sequence
    expected = torch.stack(
        [share_logits(compressed, None if t == "__base__" else t, ids)[i] for i, t in enumerate(rows)]
    )
    share_logits(compressed, None, ids)
    with torch.no_grad(), share_kernels.task_ids(compressed, rows):
        got = compressed(ids).logits
    assert rel(got, expected) < 1e-5
    assert rel(got[0], share_logits(compressed, None, ids)[0]) > 1e-3


def test_reader_folds_scaling_and_patterns(adapters):
    a = read_peft_adapter(adapters["patterns"])
    assert a.name == "patterns"
    assert a.rank("model.layers.0.self_attn.q_proj") == 3
    assert a.scaling["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 3)
    assert a.scaling["model.layers.1.self_attn.v_proj"] == pytest.approx(5 / 4)
    assert a.scaling["model.layers.1.mlp.down_proj"] == pytest.approx(16 / 4)
    b = read_peft_adapter(adapters["rslora"])
    assert all(s == pytest.approx(3 / math.sqrt(2)) for s in b.scaling.values())
    c = read_peft_adapter(adapters["legacy_bin"])
    assert c.files[-1].endswith("adapter_model.bin")
    assert not os.path.exists(os.path.join(adapters["legacy_bin"], "adapter_model.safetensors"))


def test_reader_key_spellings(adapters, tmp_path):
    """Keys with the adapter name (a raw state dict) or without the PeftModel prefix (transformers'
    own adapter integration) name the same layers."""
    from safetensors.torch import load_file, save_file

    renamed = shutil.copytree(adapters["plain"], tmp_path / "renamed")
    sd = load_file(str(renamed / "adapter_model.safetensors"))
    sd = {
        (k.replace("base_model.model.", "") if i % 2 else k).replace(".weight", ".default.weight"): v
        for i, (k, v) in enumerate(sorted(sd.items()))
    }
    save_file(sd, str(renamed / "adapter_model.safetensors"))
    a, b = read_peft_adapter(str(renamed)), read_peft_adapter(adapters["plain"])
    assert a.shapes == b.shapes
    for n in a.layers:
        assert all(torch.equal(x, y) for x, y in zip(a.factors(n), b.factors(n)))


def test_reader_pre_zip_bin(adapters, tmp_path):
    """torch's pre-1.6 format cannot be memory-mapped; it is read whole, still weights_only."""
    old = shutil.copytree(adapters["legacy_bin"], tmp_path / "old")
    sd = torch.load(str(old / "adapter_model.bin"), weights_only=True)
    torch.save(sd, str(old / "adapter_model.bin"), _use_new_zipfile_serialization=False)
    a, b = read_peft_adapter(str(old)), read_peft_adapter(adapters["legacy_bin"])
    assert a.shapes == b.shapes and a.scaling == b.scaling
    for n in a.layers:
        assert all(torch.equal(x, y) for x, y in zip(a.factors(n), b.factors(n)))


def test_named_mapping_and_dtype_bf16(base_state, adapters):
    model = fresh(base_state, torch.bfloat16)
    share_kernels.from_peft_adapters(model, {"x": adapters["plain"], "y": adapters["rslora"]}, k=64)
    layer = next(iter(adapter_layers(model).values()))
    assert layer.tasks == ["x", "y"] and layer.U.dtype == torch.bfloat16
    name = next(iter(adapter_layers(model)))
    assert rel(layer.delta_weight("x").double(), reference_update(adapters["plain"], name)) < 2e-2


# ----------------------------------------------------------------------------- k, p and the error


def _stacked_balanced(paths, layer):
    """Float64 oracle: the update's SVD per adapter, √σ on each side, stacked."""
    As, Bs = [], []
    for path in paths:
        P, S, Qh = torch.linalg.svd(reference_update(path, layer), full_matrices=False)
        As.append(Qh.t() * S.sqrt())
        Bs.append(P * S.sqrt())
    return torch.cat(As, 1), torch.cat(Bs, 1)


def test_error_falls_as_k_grows_and_matches_curve(base_state, adapters):
    parsed = read_peft_adapters(list(adapters.values()))
    layer0 = "model.layers.0.mlp.down_proj"
    stacked = sum(a.rank(layer0) for a in parsed)  # 4 + 2 + 4 + 2 = 12 (d_in = 40, d_out = 24)
    errs, overall = [], []
    ks = [1, 2, 4, 8, 11, 12]
    for i, k in enumerate(ks):
        model = fresh(base_state, torch.float64)
        fits = ingest(model, parsed, k, curve_ks=ks)
        fit = next(f for f in fits if f.name == layer0)
        assert fit.k == k and fit.stacked_rank == stacked
        layer = adapter_layers(model)[layer0]
        e = {}
        for task, path in adapters.items():  # the oracle: dW from the files against the layer's
            e[task] = rel(layer.delta_weight(task), reference_update(path, layer0))
            assert fit.error[task] == pytest.approx(e[task], rel=1e-6, abs=1e-10)
        for f in fits:  # the curve predicts what every layer got at this k
            for task in adapters:
                num, den = f.curve[task][i]
                assert math.sqrt(num / den) == pytest.approx(f.error[task], rel=1e-6, abs=1e-7), (f.name, k)
        errs.append(e)
        overall.append({t: v[i] for t, v in error_curve(fits).items()})
    for task in adapters:
        seq = [e[task] for e in errs]
        assert all(a >= b - 1e-12 for a, b in zip(seq, seq[1:])), (task, seq)
        assert seq[0] > 0.3 and seq[-1] < 1e-10
        tot = [o[task] for o in overall]
        assert all(a >= b - 1e-12 for a, b in zip(tot, tot[1:])) and tot[0] > 0.3 and tot[-1] < 1e-6
    assert stacked == 12
    # an int k beyond the stacked rank is capped at it
    model = fresh(base_state, torch.float64)
    fits = ingest(model, parsed, 40)
    assert {f.name: f.k for f in fits}[layer0] == 12
    assert all(f.k <= 12 for f in fits)


def test_k_is_capped_at_the_smaller_dimension(base_state, adapters, tmp_path):
    """v_proj is 24 -> 12: U and V share k <= 12, so a stacked rank of 14 cannot be exact."""
    extra = save_lora(base_state, str(tmp_path / "extra"), 11, r=2, lora_alpha=2)
    paths = [*adapters.values(), extra]
    model = fresh(base_state, torch.float64)
    fits = {f.name: f for f in ingest(model, read_peft_adapters(paths), 64, curve_ks=[64])}
    v = fits["model.layers.0.self_attn.v_proj"]
    assert (v.k, v.rank_a, v.rank_b) == (12, 14, 12)
    assert max(v.error.values()) > 1e-3
    for t, e in v.error.items():  # the curve knows the cap
        assert v.curve[t][0][0] == pytest.approx((e * v.norm[t]) ** 2, rel=1e-8, abs=1e-20)
    down = fits["model.layers.0.mlp.down_proj"]  # 40 -> 24 holds all 14 directions
    assert down.k == 14 and max(down.error.values()) < 1e-12


def test_energy_threshold_picks_smallest_k(base_state, adapters):
    parsed = read_peft_adapters(list(adapters.values()))
    model = fresh(base_state, torch.float64)
    fits = ingest(model, parsed, 0.8)
    for f in fits:
        GA, GB = _stacked_balanced(list(adapters.values()), f.name)
        ks = []
        for G in (GA, GB):
            e = torch.linalg.svdvals(G).square()
            frac = torch.cumsum(e, 0) / e.sum()
            ks.append(int((frac < 0.8 - 1e-12).sum()) + 1)
        assert f.k == max(ks), f.name
        assert adapter_layers(model)[f.name].k == f.k
        assert 1 < f.k < 12


def test_p_below_rank_keeps_best_rank_p(base_state, adapters):
    model = fresh(base_state, torch.float64)
    share_kernels.from_peft_adapters(model, [adapters["plain"], adapters["patterns"]], k=64, p=2)
    for name, layer in adapter_layers(model).items():
        assert layer.p == 2
        for task in ("plain", "patterns"):
            ref = reference_update(adapters[task], name)
            S = torch.linalg.svdvals(ref)
            best = float(S[2:].square().sum().sqrt() / S.square().sum().sqrt())  # Eckart-Young
            assert rel(layer.delta_weight(task), ref) == pytest.approx(best, rel=1e-8)


def test_k_below_p_below_rank(base_state, adapters):
    """k = 2 < p = 3 < r = 4: the core is k x k, so at most k columns carry anything."""
    model = fresh(base_state, torch.float64)
    fits = ingest(model, read_peft_adapters([adapters["plain"], adapters["rslora"]]), 2, p=3, curve_ks=[2])
    for f in fits:
        layer = adapter_layers(model)[f.name]
        assert (layer.k, layer.p) == (2, 3)
        assert layer.eps_a["plain"][:, 2].abs().max() == 0
        for task in ("plain", "rslora"):
            ref = reference_update(adapters[task], f.name)
            U, V = layer.U, layer.V
            assert rel(layer.delta_weight(task), V @ (V.t() @ ref @ U) @ U.t()) < 1e-10
            assert f.curve[task][0][0] == pytest.approx((f.error[task] * f.norm[task]) ** 2, rel=1e-8)


def test_untrained_adapter_is_a_zero_task(base_state, adapters, tmp_path, ids):
    torch.manual_seed(3)
    pm = peft.get_peft_model(fresh(base_state), peft.LoraConfig(r=2, target_modules=TARGETS))  # lora_B = 0
    pm.save_pretrained(str(tmp_path / "untrained"))
    model = fresh(base_state)
    rep_fits = ingest(model, read_peft_adapters([adapters["plain"], str(tmp_path / "untrained")]), 64)
    assert all(f.error["untrained"] == 0.0 and f.norm["untrained"] == 0.0 for f in rep_fits)
    assert torch.equal(share_logits(model, "untrained", ids), share_logits(model, None, ids))
    base = share_logits(model, None, ids)
    ref = peft_logits(base_state, adapters["plain"], ids)
    assert rel(share_logits(model, "plain", ids) - base, ref - base) < 2e-5


# ----------------------------------------------------------------------------- export


def test_export_loads_in_peft_and_round_trips(base_state, adapters, compressed, ids, tmp_path):
    base = share_logits(compressed, None, ids)
    for task in adapters:
        out = str(tmp_path / f"exp-{task}")
        share_kernels.to_peft_adapter(compressed, task, out)
        assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
        with open(os.path.join(out, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
        ours = share_logits(compressed, task, ids)
        assert rel(peft_logits(base_state, out, ids) - base, ours - base) < 2e-5, task
    # re-import the exported adapters: the same updates
    exported = {t: str(tmp_path / f"exp-{t}") for t in adapters}
    again = fresh(base_state)
    share_kernels.from_peft_adapters(again, exported, k=64)
    for name, layer in adapter_layers(again).items():
        for task in adapters:
            ref = adapter_layers(compressed)[name].delta_weight(task).double()
            assert rel(layer.delta_weight(task).double(), ref) < 1e-5


def test_export_of_truncated_task_matches_share(base_state, adapters, ids, tmp_path):
    model = fresh(base_state)
    share_kernels.from_peft_adapters(model, [adapters["plain"], adapters["rslora"]], k=3)
    out = str(tmp_path / "exp")
    share_kernels.to_peft_adapter(model, "rslora", out, base_model_name_or_path="tiny-llama")
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "tiny-llama"
    base = share_logits(model, None, ids)
    ours = share_logits(model, "rslora", ids)
    full = peft_logits(base_state, adapters["rslora"], ids)
    assert rel(ours - base, full - base) > 1e-3  # k = 3 lost something
    assert rel(peft_logits(base_state, out, ids) - base, ours - base) < 2e-5


def test_export_errors(base_state, compressed, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        share_kernels.to_peft_adapter(compressed, "nope", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no adapter layers"):
        share_kernels.to_peft_adapter(fresh(base_state), "plain", str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- bad inputs


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s, p: p.__setitem__(0, _ia3(s, p[1])), "peft_type 'IA3'"),
        (lambda s, p: p.__setitem__(0, _loha(s, p[1])), "peft_type 'LOHA'"),
        (lambda s, p: p.__setitem__(0, save_lora(s, p[1], 9, r=2, lora_alpha=2, use_dora=True)), "use_dora"),
        (
            lambda s, p: p.__setitem__(0, save_lora(s, p[1], 9, r=2, lora_alpha=2, modules_to_save=["lm_head"])),
            "modules_to_save",
        ),
        (lambda s, p: p.__setitem__(0, save_lora(s, p[1], 9, r=2, lora_alpha=2, bias="lora_only")), "bias"),
        (
            lambda s, p: p.__setitem__(0, _copy_with_config(p[2], p[1], init_lora_weights="pissa_niter_4")),
            "init_lora_weights='pissa_niter_4' is not supported",
        ),
        (lambda s, p: p.__setitem__(0, _copy_with_config(p[2], p[1], init_lora_weights="olora")), "olora"),
    ],
    ids=["ia3", "loha", "dora", "modules_to_save", "bias", "pissa", "olora"],
)
def test_rejects_what_share_cannot_represent(base_state, adapters, tmp_path, make, match):
    slot = [None, str(tmp_path / "bad"), adapters["plain"]]
    make(base_state, slot)
    with pytest.raises(ValueError, match=match):
        share_kernels.from_peft_adapters(fresh(base_state), [adapters["plain"], slot[0]], k=8)


def _ia3(state, path):
    cfg = peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    peft.get_peft_model(fresh(state), cfg).save_pretrained(path)
    return path


def _loha(state, path):
    peft.get_peft_model(fresh(state), peft.LoHaConfig(r=2, target_modules=TARGETS)).save_pretrained(path)
    return path


def test_rejects_mismatched_adapters(base_state, adapters, tmp_path):
    plain = adapters["plain"]
    other_base = _copy_with_config(plain, tmp_path / "other", base_model_name_or_path="org/other-model")
    first = _copy_with_config(plain, tmp_path / "first", base_model_name_or_path="org/model")
    with pytest.raises(ValueError, match="different base models"):
        share_kernels.from_peft_adapters(fresh(base_state), [first, other_base], k=8)
    local_copy = _copy_with_config(plain, tmp_path / "local", base_model_name_or_path="/models/model/")
    share_kernels.from_peft_adapters(fresh(base_state), [first, local_copy], k=8)  # the same model
    # fewer target modules
    q_only = save_lora(base_state, str(tmp_path / "q_only"), 3, targets=["q_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="adapt different layers"):
        share_kernels.from_peft_adapters(fresh(base_state), [plain, q_only], k=8)
    # a wider model: the shapes disagree
    torch.manual_seed(0)
    wide = peft.get_peft_model(
        transformers.LlamaForCausalLM(llama_config(hidden=32)),
        peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False),
    )
    wide.save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="belong to different base models"):
        share_kernels.from_peft_adapters(fresh(base_state), [plain, str(tmp_path / "wide")], k=8)
    with pytest.raises(ValueError, match="trained on another base model"):
        share_kernels.from_peft_adapters(fresh(base_state), [str(tmp_path / "wide")], k=8)
    # the config's r disagrees with the tensors
    lying = _copy_with_config(plain, tmp_path / "lying", r=5)
    with pytest.raises(ValueError, match="has rank 4 but the config gives r=5"):
        read_peft_adapter(lying)
    # two directories of one name
    os.makedirs(tmp_path / "again")
    dup = shutil.copytree(plain, tmp_path / "again" / "plain")
    with pytest.raises(ValueError, match="several adapter directories are named"):
        share_kernels.from_peft_adapters(fresh(base_state), [plain, str(dup)], k=8)


def test_rejects_bad_arguments_and_files(base_state, adapters, tmp_path):
    plain = [adapters["plain"]]
    for k, match in [(0, "k must be >= 1"), (1.5, r"\(0, 1\]"), ("abc", "energy threshold"), (True, "k:")]:
        with pytest.raises(ValueError, match=match):
            share_kernels.from_peft_adapters(fresh(base_state), plain, k=k)
    with pytest.raises(ValueError, match="p must be a positive int"):
        share_kernels.from_peft_adapters(fresh(base_state), plain, k=4, p=0)
    with pytest.raises(TypeError, match="not one path"):
        share_kernels.from_peft_adapters(fresh(base_state), adapters["plain"], k=4)
    bad_name = shutil.copytree(adapters["plain"], tmp_path / "v1.0")
    with pytest.raises(ValueError, match="invalid task name 'v1.0'.*mapping"):
        share_kernels.from_peft_adapters(fresh(base_state), [str(bad_name)], k=4)
    nan = shutil.copytree(adapters["plain"], tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(nan / "adapter_model.safetensors"))
    next(iter(sd.values()))[0, 0] = float("nan")
    save_file(sd, str(nan / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_peft_adapter(str(nan))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        read_peft_adapter(str(tmp_path))
    wrapped = fresh(base_state)
    share_kernels.from_peft_adapters(wrapped, plain, k=4)
    with pytest.raises(ValueError, match="already wrapped"):
        share_kernels.from_peft_adapters(wrapped, plain, k=4)
    with pytest.raises(ValueError, match="layers the model does not have"):
        share_kernels.from_peft_adapters(torch.nn.Sequential(torch.nn.Linear(24, 24)), plain, k=4)
    # a legacy .bin that needs more than weights_only allows is refused, not unpickled
    evil = tmp_path / "evil"
    shutil.copytree(adapters["legacy_bin"], evil)
    torch.save({"x": torch.zeros(1), "y": _Opaque()}, str(evil / "adapter_model.bin"))
    with pytest.raises(ValueError, match=r"weights_only=True"):
        read_peft_adapter(str(evil))
    (evil / "adapter_model.bin").unlink()
    with pytest.raises(ValueError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        read_peft_adapter(str(evil))


class _Opaque:
    pass


# ----------------------------------------------------------------------------- the command


def test_cli_compress_end_to_end(base_state, adapters, ids, tmp_path, capsys):
    out, png = str(tmp_path / "out"), str(tmp_path / "err.png")
    cfg_dir = str(tmp_path / "base")
    llama_config().save_pretrained(cfg_dir)  # --base: config only, no weights
    rc = main(["compress", *adapters.values(), "--k", "64", "--out", out, "--plot", png, "--base", cfg_dir, "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "4 peft LoRA adapters, 6 layers" in text and "legacy_bin" in text
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "compress_report.json")) as f:
        report = json.load(f)
    from share_kernels.continual.io import saved_files

    files = saved_files(out)
    assert sorted(files) == sorted(["shared.safetensors", *(f"task-{t}.safetensors" for t in adapters)])
    written = [os.path.join(out, "share_config.json"), *files.values()]
    assert report["output_bytes"] == sum(os.path.getsize(n) for n in written)
    for t, path in adapters.items():
        files = ["adapter_config.json", "adapter_model.bin" if t == "legacy_bin" else "adapter_model.safetensors"]
        assert report["input_bytes"][t] == sum(os.path.getsize(os.path.join(path, n)) for n in files)
        assert report["adapter_error"][t] < 1e-6
    assert report["k"]["model.layers.0.mlp.down_proj"] == 12
    assert report["sources"]["plain"]["path"] == adapters["plain"]
    # the directory loads onto the real base model and reproduces every adapter
    model = fresh(base_state)
    assert share_kernels.load_adapters(model, out) == list(adapters)
    base = share_logits(model, None, ids)
    for task, path in adapters.items():
        ref = peft_logits(base_state, path, ids)
        assert rel(share_logits(model, task, ids) - base, ref - base) < 2e-5, task


def test_cli_small_k_report_matches_oracle(adapters, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["compress", adapters["plain"], adapters["rslora"], "--k", "2", "--out", out]) == 0
    text = capsys.readouterr().out
    with open(os.path.join(out, "compress_report.json")) as f:
        report = json.load(f)
    assert set(report["k"].values()) == {2} and report["p"] == 4
    for layer, errs in ((n, [report["error"][t][n] for t in ("plain", "rslora")]) for n in report["k"]):
        for task, e in zip(("plain", "rslora"), errs):
            ref = reference_update(adapters[task], layer)
            GA, GB = _stacked_balanced([adapters["plain"], adapters["rslora"]], layer)
            U = torch.linalg.svd(GA, full_matrices=False).U[:, :2]
            V = torch.linalg.svd(GB, full_matrices=False).U[:, :2]
            oracle = rel(V @ (V.t() @ ref @ U) @ U.t(), ref)
            assert e == pytest.approx(oracle, rel=1e-4, abs=1e-6), (layer, task)
        assert f"{sum(errs) / 2:.3g}" in text


def test_cli_errors(base_state, adapters, tmp_path, capsys):
    ia3 = _ia3(base_state, str(tmp_path / "ia3"))
    assert main(["compress", adapters["plain"], ia3, "--k", "4", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "peft_type 'IA3'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    wide = str(tmp_path / "wide_cfg")
    llama_config(hidden=32).save_pretrained(wide)
    assert main(["compress", adapters["plain"], "--k", "4", "--out", str(tmp_path / "o"), "--base", wide]) == 2
    assert "trained on another base model" in capsys.readouterr().err
    assert main(["compress", adapters["plain"], "--k", "0.", "--out", str(tmp_path / "o")]) == 2


def test_cli_plot_without_matplotlib(adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = str(tmp_path / "o")
    assert main(["compress", adapters["plain"], "--k", "4", "--out", out, "--plot", str(tmp_path / "e.png")]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_skeleton_holds_no_weights():
    model = skeleton_model({"a.b.0.q": (4096, 4096), "a.b.0.v": (4096, 1024), "head": (8, 3)})
    lin = model.get_submodule("a.b.0.q")
    assert isinstance(lin, torch.nn.Linear) and (lin.in_features, lin.out_features) == (4096, 4096)
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) <= 3 * 8
    with pytest.raises(ValueError, match="inside another adapted layer"):
        skeleton_model({"a": (2, 2), "a.b": (2, 2)})
    with pytest.raises(ValueError, match="also the parent"):
        skeleton_model({"a.b": (2, 2), "a": (2, 2)})


def test_compress_function_report(adapters, tmp_path):
    rep = compress([adapters["plain"], adapters["patterns"]], "0.9999999", str(tmp_path / "o"), progress=False)
    assert rep.adapters == ["plain", "patterns"] and rep.p == 4 and rep.k_requested == pytest.approx(0.9999999)
    assert rep.k == rep.stacked_rank  # a threshold this close to 1 keeps every direction
    assert all(rep.adapter_error(a) < 1e-5 for a in rep.adapters)
    assert rep.output_bytes > rep.shared_bytes > 0
    assert "rel. error of dW" in str(rep)


@requires_cuda
@pytest.mark.cuda
def test_svds_on_cuda_match_cpu(base_state, adapters):
    parsed = read_peft_adapters(list(adapters.values()))
    fits = {}
    for dev in ("cpu", "cuda"):
        model = fresh(base_state, torch.float64)
        fits[dev] = ingest(model, parsed, 6, curve_ks=[2, 6], device=dev)
        fits[dev + "-model"] = model
    for fc, fg in zip(fits["cpu"], fits["cuda"]):
        assert fc.k == fg.k == 6
        for t in adapters:
            assert fg.error[t] == pytest.approx(fc.error[t], rel=1e-9)
            assert fg.curve[t] == pytest.approx(fc.curve[t], rel=1e-9)
        lc, lg = adapter_layers(fits["cpu-model"])[fc.name], adapter_layers(fits["cuda-model"])[fg.name]
        for t in adapters:  # bases may differ in sign; the updates may not
            assert rel(lg.delta_weight(t), lc.delta_weight(t)) < 1e-10


def test_cli_names_adapters_with_name_equals_dir(adapters, tmp_path, capsys):
    """Checkpoint layouts (run1/checkpoint-500, run2/checkpoint-500) share a basename: NAME=DIR
    names them apart; without names the error says how."""
    a, b = tmp_path / "run1" / "checkpoint-500", tmp_path / "run2" / "checkpoint-500"
    shutil.copytree(adapters["plain"], a)
    shutil.copytree(adapters["rslora"], b)
    out = str(tmp_path / "out")
    assert main(["compress", str(a), str(b), "--k", "4", "--out", out, "--quiet"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["compress", f"first={a}", f"second={b}", "--k", "4", "--out", out, "--quiet"]) == 0
    with open(os.path.join(out, "share_config.json")) as f:
        assert json.load(f)["tasks"] == ["first", "second"]
    from share_kernels.continual.compress import parse_adapter_args

    assert parse_adapter_args([str(a), f"x={b}"]) == {"checkpoint-500": str(a), "x": str(b)}
    assert parse_adapter_args([str(a)]) == [str(a)]
    with pytest.raises(ValueError, match="NAME=ADAPTER_DIR"):
        parse_adapter_args([f"={a}"])
    with pytest.raises(ValueError, match="two adapters would be named 'x'"):
        parse_adapter_args([f"x={a}", f"x={b}"])
