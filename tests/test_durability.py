"""Saved adapters survive a process killed mid-save, failing system calls and damaged files.

A save is one commit: whatever instant it dies, the next load yields the complete previous
state or the complete new one. Damage on disk (bit flips, truncation, swapped files, wrong
dtypes, NaN) is refused with a ValueError naming the file.
"""
import builtins
import hashlib
import json
import os
import random
import shutil
import signal
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import share_kernels.continual.io as io_mod
from share_kernels.continual import ContinualLearner, load_adapters, save_adapters
from share_kernels.continual.io import CONFIG_FILE, LOCK_FILE, _manifest_digest, saved_files

F64 = torch.float64
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="kill tests fork the test process")


def tiny_mlp():
    return nn.Sequential(nn.Linear(9, 14, dtype=F64), nn.GELU(), nn.Linear(14, 5, dtype=F64))


def trained(tasks, method="share", seed=1, **cfg):
    torch.manual_seed(seed)
    model = tiny_mlp()
    extra = {"share": {"k": 4, "p": 2, "r": 2}, "inflora": {"r": 2}, "pslora": {"r": 2}}[method]
    learner = ContinualLearner(model, method, target_modules=["0", "2"], **{**extra, **cfg})
    for t in tasks:
        add_task(learner, t, method)
    return model, learner


def add_task(learner, t, method="share"):
    x = torch.randn(16, 9, dtype=F64)
    learner.begin_task(t, [x] if method == "inflora" else None)
    with torch.no_grad():
        for prm in learner.trainable_parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    learner.end_task(t, [x] if method == "inflora" else None)


def state_of_model(model, tasks=None):
    """(tasks, {name: tensor}) of a wrapped model: every shared and task tensor, cloned."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "shared_tensors")}
    tasks = list(next(iter(layers.values())).tasks) if tasks is None else list(tasks)
    out = {}
    for n, layer in layers.items():
        out.update({f"{n}.{k}": v.detach().clone() for k, v in layer.shared_tensors().items()})
        for t in tasks:
            out.update({f"{t}/{n}.{k}": v.detach().clone() for k, v in layer.task_tensors(t).items()})
    return tasks, out


def state_on_disk(directory):
    """What the next load yields: None when the directory holds no save."""
    model = tiny_mlp()
    try:
        tasks = load_adapters(model, directory)
    except ValueError as e:
        if "holds no share_config.json" in str(e):
            return None
        raise
    return state_of_model(model, tasks)


def same(a, b):
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def which(found, states):
    hits = [name for name, s in states.items() if same(found, s)]
    assert hits, f"the directory loads as none of the states {list(states)}: tasks {found and found[0]}"
    return hits[0]


def only_referenced_files(directory):
    """After a completed save: the manifest, the lock and the files the manifest uses, nothing else."""
    files = set(saved_files(directory).values())
    found = set()
    for entry in os.listdir(directory):
        full = os.path.join(directory, entry)
        if os.path.isdir(full):
            found |= {os.path.join(full, f) for f in os.listdir(full)}
        elif entry not in (CONFIG_FILE, LOCK_FILE):
            found.add(full)
    return found == files


# ----------------------------------------------------------------------------- scenarios


@pytest.fixture(scope="module")
def scenarios():
    """Saves a process may be in the middle of, as (old state, save call, new state)."""
    merged2, learner = trained(["a", "b"])
    old_merged = state_of_model(merged2)
    add_task(learner, "c")  # consolidation moves U and V
    new_merged = state_of_model(merged2)

    kept, klearner = trained(["a", "b"], merge=False, seed=2)
    old_kept = state_of_model(kept)
    add_task(klearner, "c")  # U, V kept: a, b bit-identical
    new_kept = state_of_model(kept)

    return {
        "first save": (lambda d: None, lambda d: save_adapters(merged2, d), new_merged),
        "full save after a merge": (
            lambda d: save_adapters_state(d, old_merged),
            lambda d: save_adapters(merged2, d),
            new_merged,
        ),
        "incremental tasks=['c']": (
            lambda d: save_adapters_state(d, old_kept),
            lambda d: save_adapters(kept, d, tasks=["c"]),
            new_kept,
        ),
    }, {"merged a,b": old_merged, "merged a,b,c": new_merged, "kept a,b": old_kept, "kept a,b,c": new_kept}


_REFS = {}


def save_adapters_state(directory, state):
    """Save a model that holds exactly ``state`` (rebuilt by loading a reference save)."""
    key = id(state)
    src = _REFS[key]
    shutil.copytree(src, directory, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def refs(scenarios, tmp_path_factory):
    """A saved directory for every old state (copied as the starting point of each trial)."""
    _, states = scenarios
    merged2, learner = trained(["a", "b"])
    kept, _ = trained(["a", "b"], merge=False, seed=2)
    for state, model in ((states["merged a,b"], merged2), (states["kept a,b"], kept)):
        d = tmp_path_factory.mktemp("ref")
        save_adapters(model, d)
        assert same(state_on_disk(d), state)
        _REFS[id(state)] = str(d)
    return _REFS


_OPS = ("replace", "rename", "fsync", "mkdir", "unlink", "rmdir")


class StepHook:
    """Wraps the file-system calls a save makes (os.replace, os.rename, os.fsync, os.mkdir,
    os.unlink, os.rmdir, and every write through ``open``) and calls ``on_step(i, op)`` before
    the i-th one."""

    def __init__(self, monkeypatch, on_step):
        self.n = 0
        for op in _OPS:
            real = getattr(os, op)
            monkeypatch.setattr(io_mod.os, op, self._wrap(real, op, on_step))
        real_open = builtins.open

        def opened(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            if "w" not in mode:
                return f
            on_step(self._next(), "write")
            return f

        monkeypatch.setattr(io_mod, "open", opened, raising=False)

    def _next(self):
        self.n += 1
        return self.n - 1

    def _wrap(self, real, op, on_step):
        def call(*a, **k):
            on_step(self._next(), op)
            return real(*a, **k)

        return call


# ----------------------------------------------------------------------------- kill tests


def _run_killed(fn, kill_after):
    """Run ``fn`` in a forked child and SIGKILL it after ``kill_after`` seconds (or let it call
    os._exit). Returns whether the kill hit before the child finished."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60  # a child that hangs (a lock held by another thread at fork) fails the test
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish within 60 s")
        time.sleep(0.001)


@fork_only
def test_kill_at_every_step_of_a_save(scenarios, refs, tmp_path, monkeypatch):
    """A child process dies by SIGKILL right before each file-system call of a save in turn."""
    saves, states = scenarios
    trials = 0
    for name, (setup, do_save, new) in saves.items():
        count = tmp_path / f"count-{name.replace(' ', '_')}"
        setup(count)
        old = state_on_disk(count)
        with monkeypatch.context() as m:
            hook = StepHook(m, lambda i, op: None)
            do_save(count)
        steps = hook.n
        assert steps >= 6, name
        for i in range(steps + 1):
            d = tmp_path / f"{name.replace(' ', '_')}-{i}"
            setup(d)

            def child():
                with monkeypatch.context() as m:

                    def die(j, op):
                        if j == i:
                            os.kill(os.getpid(), signal.SIGKILL)

                    StepHook(m, die)
                    do_save(d)

            killed = _run_killed(child, None)
            assert killed == (i < steps), (name, i)
            found = state_on_disk(d)
            assert same(found, old) or same(found, new), (name, i)
            trials += 1
            save_adapters_again = saves[name][1]
            save_adapters_again(d)  # the next save cleans what the dead one left
            assert same(state_on_disk(d), new) and only_referenced_files(d), (name, i)
            shutil.rmtree(d)
    print(f"kill-at-every-step trials: {trials}")
    assert trials >= 25


@fork_only
def test_kill_at_random_instants(scenarios, refs, tmp_path):
    """>= 60 children killed by SIGKILL at random instants while they save in a loop."""
    saves, states = scenarios
    rng = random.Random(0)
    names = list(saves)
    # how long one save takes here, to aim the kills inside saves
    d0 = tmp_path / "timing"
    t0 = time.perf_counter()
    for _ in range(5):
        saves["full save after a merge"][1](d0)
    per_save = (time.perf_counter() - t0) / 5
    outcomes = {"old": 0, "new": 0, "killed": 0}
    trials = 0
    for trial in range(60):
        name = names[trial % len(names)]
        setup, do_save, new = saves[name]
        d = tmp_path / f"r{trial}"
        setup(d)
        old = state_on_disk(d)
        outcomes["killed"] += _run_killed(lambda: do_save(d), rng.uniform(0, 1.5 * per_save))
        found = state_on_disk(d)
        if same(found, new):
            outcomes["new"] += 1
        else:
            assert same(found, old), (name, trial)
            outcomes["old"] += 1
        trials += 1
        do_save(d)
        assert same(state_on_disk(d), new) and only_referenced_files(d), (name, trial)
        shutil.rmtree(d)
    print(
        f"random-kill trials: {trials}, killed before the save returned {outcomes['killed']}, loaded old "
        f"{outcomes['old']}, new {outcomes['new']}; one save {per_save * 1e3:.1f} ms"
    )
    assert trials >= 50


def test_each_failing_call_of_a_save_leaves_the_old_or_the_new_state(scenarios, refs, tmp_path, monkeypatch):
    """Every os.replace / os.rename (and every other file-system call) of a save raises in
    turn: the save raises, the next load yields the old or the new state, the next save works."""
    saves, _ = scenarios
    failed_replace = 0
    for name, (setup, do_save, new) in saves.items():
        count = tmp_path / f"count-{name.replace(' ', '_')}"
        setup(count)
        with monkeypatch.context() as m:
            ops = []
            StepHook(m, lambda i, op: ops.append(op))
            do_save(count)
        assert "replace" in ops, name
        for i, op in enumerate(ops):
            d = tmp_path / f"{name.replace(' ', '_')}-fail{i}"
            setup(d)
            old = state_on_disk(d)

            def fail(j, _op, i=i):
                if j == i:
                    raise OSError(f"injected failure of {_op}")

            raised = False
            with monkeypatch.context() as m:
                StepHook(m, fail)
                try:
                    do_save(d)
                except OSError as e:
                    assert "injected" in str(e)
                    raised = True
            found = state_on_disk(d)
            # a save that returned (a failure it may absorb: makedirs of an existing folder, rmdir
            # of an old folder) has committed
            assert raised or same(found, new), (name, i, op)
            assert same(found, old) or same(found, new), (name, i, op)
            if op == "replace":
                failed_replace += 1
                assert same(found, old), (name, i)  # the commit did not happen
            do_save(d)
            assert same(state_on_disk(d), new) and only_referenced_files(d), (name, i, op)
            shutil.rmtree(d)
    assert failed_replace == len(saves)


# ----------------------------------------------------------------------------- corruption


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("method", ["share", "inflora", "pslora"])
def test_bit_flips_truncation_and_swaps_are_refused(method, tmp_path):
    """Damage to every file kind (manifest, shared file, task file): a flipped bit in the
    header and in the tensor data, truncation, a swapped pair of task files, and a reordered
    task list. Each load raises ValueError naming the file; nothing loads as a wrong model."""
    model, _ = trained(["a", "b"], method=method)
    src = tmp_path / "src"
    save_adapters(model, src)
    good = state_on_disk(src) if method == "share" else None
    rng = random.Random(1)
    trials = 0

    def check(mutate, match):
        nonlocal trials
        d = tmp_path / f"t{trials}"
        shutil.copytree(src, d)
        mutate(d)
        fresh = tiny_mlp()
        with pytest.raises(ValueError, match=match):
            load_adapters(fresh, d)
        assert isinstance(fresh[0], nn.Linear)  # nothing changed
        trials += 1
        shutil.rmtree(d)

    names = list(saved_files(src))
    for name in names:
        rel = os.path.relpath(saved_files(src)[name], src)
        size = os.path.getsize(src / rel)
        header = 8 + int.from_bytes((src / rel).read_bytes()[:8], "little")
        for _ in range(4):
            off = rng.randrange(0, header)
            check(lambda d: _flip(d / rel, off), name)
            off = rng.randrange(header, size)
            check(lambda d: _flip(d / rel, off), name)
        for cut in (0, 7, header - 1, size - 1):
            check(lambda d: os.truncate(d / rel, cut), name)
    # the manifest: flips anywhere, truncation, a reordered task list
    msize = os.path.getsize(src / CONFIG_FILE)
    for _ in range(8):
        off = rng.randrange(0, msize)
        check(lambda d: _flip(d / CONFIG_FILE, off), CONFIG_FILE)
    check(lambda d: os.truncate(d / CONFIG_FILE, msize // 2), CONFIG_FILE)

    def reorder(d):
        cfg = json.loads((d / CONFIG_FILE).read_text())
        cfg["tasks"] = cfg["tasks"][::-1]
        (d / CONFIG_FILE).write_text(json.dumps(cfg))

    check(reorder, CONFIG_FILE)

    def swap(d):
        files = saved_files(d)
        a, b = files["task-a.safetensors"], files["task-b.safetensors"]
        os.rename(a, a + ".x")
        os.rename(b, a)
        os.rename(a + ".x", b)

    check(swap, "task-(a|b).safetensors")
    print(f"{method}: corruption trials {trials}")
    assert trials >= 40
    if good is not None:
        assert same(state_on_disk(src), good)


def _rewrite(directory, name, tensors, metadata):
    """Replace a file by other tensors and record its digest (an edit the digests cannot see)."""
    data = st_save(tensors, metadata=metadata)
    path = saved_files(directory)[name]
    with open(path, "wb") as f:
        f.write(data)
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    cfg["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    cfg["manifest_sha256"] = _manifest_digest(cfg)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.to(torch.float16), r"tensor '0.eps_a' has dtype float16, the manifest says float64"),
        (lambda t: t.to(torch.int64), r"tensor '0.eps_a' has dtype int64"),
        (lambda t: torch.full_like(t, float("nan")), r"tensor '0.eps_a' holds NaN or infinite values"),
        (lambda t: torch.full_like(t, float("inf")), r"tensor '0.eps_a' holds NaN or infinite values"),
    ],
)
def test_valid_files_with_wrong_dtypes_or_values_are_refused(change, match, tmp_path):
    model, _ = trained(["a", "b"])
    save_adapters(model, tmp_path)
    path = saved_files(tmp_path)["task-b.safetensors"]
    data = open(path, "rb").read()
    tensors = st_load(data)
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors["0.eps_a"] = change(tensors["0.eps_a"])
    _rewrite(tmp_path, "task-b.safetensors", tensors, meta)
    with pytest.raises(ValueError, match=r"task-b.safetensors.*" + match):
        load_adapters(tiny_mlp(), tmp_path)


def test_a_file_from_another_save_is_refused(tmp_path):
    """A task file copied in from another save, with a recomputed digest, names the wrong task."""
    model, _ = trained(["a", "b"])
    save_adapters(model, tmp_path)
    files = saved_files(tmp_path)
    data = open(files["task-a.safetensors"], "rb").read()
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    _rewrite(tmp_path, "task-b.safetensors", st_load(data), meta)
    with pytest.raises(ValueError, match="task-b.safetensors.*holds task 'a'"):
        load_adapters(tiny_mlp(), tmp_path)


def test_loaded_tensors_own_their_memory(tmp_path):
    """Rewriting or truncating the files after a load leaves the loaded model as it was."""
    for method in ("share", "pslora"):
        model, _ = trained(["a", "b"], method=method)
        d = tmp_path / method
        save_adapters(model, d)
        fresh = tiny_mlp()
        load_adapters(fresh, d)
        before = state_of_model(fresh)
        for path in saved_files(d).values():
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.seek(size // 2)
                f.write(b"\x7f" * (size - size // 2))
            os.truncate(path, 8)
        assert same(state_of_model(fresh), before)


def test_version_1_layout_still_loads(tmp_path):
    """A directory in the first layout (files next to the config, no digests) loads; the next
    save converts it and removes the old files."""
    model, _ = trained(["a", "b"])
    save_adapters(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    for name, path in saved_files(tmp_path).items():
        shutil.move(path, tmp_path / name)
    for key in ("files", "manifest_sha256"):
        del cfg[key]
    for spec in cfg["layers"].values():
        del spec["shared_dtypes"], spec["task_dtypes"]
    cfg["version"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    expected = state_of_model(model)
    assert same(state_on_disk(tmp_path), expected)
    with pytest.warns(UserWarning, match="version-1 layout"):
        save_adapters(model, tmp_path, tasks=["b"])
    save_adapters(model, tmp_path)
    assert same(state_on_disk(tmp_path), expected) and only_referenced_files(tmp_path)


# ----------------------------------------------------------------------------- peft adapter files


def write_peft_adapter(path, seed=0, **config):
    """A peft LoRA adapter directory as ``save_pretrained`` writes it (two layers, r=2)."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0", "2"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for layer, (d_in, d_out) in {"0": (9, 14), "2": (14, 5)}.items():
        tensors[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(2, d_in)
        tensors[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(d_out, 2)
    (path / "adapter_model.safetensors").write_bytes(st_save(tensors))
    return str(path)


def test_peft_adapter_files_are_checked_as_far_as_they_can_be(tmp_path):
    """peft writes no digest; what can be checked is: the safetensors header (flips, truncation),
    dtypes, finiteness, shapes, the config's numbers and patterns, and the factors again when
    they are used (the file may change in between). Every failure is a ValueError / TypeError
    naming the file: ``compress`` (and the CLI's exit status 2) sees only those."""
    from share_kernels.continual.compress import compress
    from share_kernels.continual.peft_io import read_peft_adapter

    good = write_peft_adapter(tmp_path / "good")
    read_peft_adapter(good).factors("0")
    rng = random.Random(2)
    wfile = tmp_path / "good" / "adapter_model.safetensors"
    raw = wfile.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    cases = []
    for i in range(12):  # flips in the header: a broken JSON header or offsets
        off = rng.randrange(0, header)
        cases.append((f"header flip {off}", lambda d, off=off: _flip(d / "adapter_model.safetensors", off)))
    for cut in (0, 5, header - 3, header + 3, len(raw) - 1):
        cases.append((f"truncated to {cut}", lambda d, cut=cut: os.truncate(d / "adapter_model.safetensors", cut)))

    def retensor(change):
        def mutate(d):
            t = st_load((d / "adapter_model.safetensors").read_bytes())
            key = "base_model.model.2.lora_B.weight"
            t[key] = change(t[key])
            (d / "adapter_model.safetensors").write_bytes(st_save(t))

        return mutate

    cases += [
        ("NaN", retensor(lambda t: torch.full_like(t, float("nan")))),
        ("inf", retensor(lambda t: torch.full_like(t, float("inf")))),
        ("int", retensor(lambda t: t.to(torch.int32))),
        ("3-D", retensor(lambda t: t[None])),
        ("rank", retensor(lambda t: t[:, :1].contiguous())),
    ]

    def reconfig(**kw):
        def mutate(d):
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(kw)
            (d / "adapter_config.json").write_text(json.dumps(cfg))

        return mutate

    cases += [
        ("lora_alpha NaN", lambda d: (d / "adapter_config.json").write_text(
            (d / "adapter_config.json").read_text().replace('"lora_alpha": 4', '"lora_alpha": NaN'))),
        ("rank_pattern list", reconfig(rank_pattern=["0"])),
        ("bad regex", reconfig(rank_pattern={"(": 2})),
        ("alpha_pattern string", reconfig(alpha_pattern={"0": "x"})),
        ("r string", reconfig(r="2")),
        ("config not JSON", lambda d: (d / "adapter_config.json").write_bytes(b"\xff{")),
    ]
    for i, (what, mutate) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        shutil.copytree(good, d)
        mutate(d)
        with pytest.raises((ValueError, TypeError), match=str(d)):
            read_peft_adapter(str(d))
        with pytest.raises((ValueError, TypeError)):
            compress([str(d)], 2, str(tmp_path / f"out{i}"), progress=False)
    # the file changes after it was read: the factors are checked again when they are used
    d = tmp_path / "later"
    shutil.copytree(good, d)
    adapter = read_peft_adapter(str(d))
    retensor(lambda t: torch.full_like(t, float("nan")))(d)
    with pytest.raises(ValueError, match="lora_B holds NaN"):
        adapter.factors("2")
    # the factors own their memory
    d = tmp_path / "owned"
    shutil.copytree(good, d)
    A, B = read_peft_adapter(str(d)).factors("0")
    before = (A.clone(), B.clone())
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * len(raw))
    assert torch.equal(A, before[0]) and torch.equal(B, before[1])
    print(f"peft corruption trials: {len(cases) + 1}")
