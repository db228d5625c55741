"""The command line as a new user meets it: fast --help, one-line errors with exit status 2.
Subprocesses, each well under a second (no command here imports torch for long work)."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "share_kernels.cli", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    return p, time.perf_counter() - t0


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["compress", "--help"], ["continual", "--help"]])
def test_help_is_fast_and_complete(args):
    p, seconds = cli(*args)
    assert p.returncode == 0 and p.stderr == ""
    assert seconds < 2.0, f"{args}: {seconds:.2f} s"
    out = p.stdout
    assert max(len(line) for line in out.splitlines()) <= 120
    import argparse

    from share_kernels.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in subs.choices.items():
        assert sp.description, name
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    if args == ["bench", "--help"]:
        from share_kernels.bench import SUITES

        assert all(s in out for s in SUITES)
    if args == ["--help"]:
        assert "continual low-rank adaptation" in out and all(c in out for c in ("bench", "compress", "continual"))


def test_help_imports_no_torch():
    code = "import sys; from share_kernels.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.stdout.strip() == "False", p.stderr


def test_continual_defaults_match_the_harness():
    from share_kernels.cli import CONTINUAL_DEFAULTS
    from share_kernels.harness.run import HarnessConfig

    d = HarnessConfig()
    for k, v in CONTINUAL_DEFAULTS.items():
        got = getattr(d, k)
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == v, k


def one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "error:" in lines[0] and all(n in lines[0] for n in needles), lines[0]


def test_user_errors_are_one_line_exit_2(tmp_path):
    one_line_error(cli("bench", "nosuch")[0], "unknown suite", "nosuch", "lowrank_linear")
    one_line_error(cli("bench", "--preset", "nope")[0], "--preset")
    one_line_error(cli("nosuchcommand")[0], "nosuchcommand")
    one_line_error(cli("continual", "--methods", "nosuchmethod", "--out", str(tmp_path / "o"))[0], "nosuchmethod")
    assert not os.path.exists(tmp_path / "o")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}')
    (bad / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    one_line_error(cli("compress", str(bad), "--k", "2", "--out", str(tmp_path / "c"), "--quiet")[0], "safetensors")


def test_bench_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is not an error here")
    one_line_error(cli("bench", "--device", "cuda", "--preset", "quick")[0], "--device cuda", "no CUDA device")


def test_bench_output_counter_legend_width_verdicts(tmp_path, monkeypatch, capsys):
    """The runner around the suites (a fake suite: the real ones are the benchmarks' business)."""
    import types

    import torch

    import share_kernels.bench as bench

    rows = [
        {"case": f"fwd M={m} k=16", "dtype": "float32", **{f"impl{i} ms": 1.5 * i for i in range(14)},
         "fused/F.linear": 1.01, "reference/fused": 1.1, "note": "fake"} for m in (1, 8192)
    ]
    fake = types.SimpleNamespace(run=lambda device, preset, echo=print: rows)
    monkeypatch.setitem(sys.modules, "fake_suite", fake)
    monkeypatch.setitem(bench.SUITES, "lowrank_linear", "fake_suite")
    bench.run_suites(["lowrank_linear"], torch.device("cpu"), "quick", str(tmp_path))
    out = capsys.readouterr().out
    assert "[1/1] lowrank_linear" in out and "s elapsed" in out and "Legend:" in out
    assert max(len(ln) for ln in out.splitlines()) <= 120
    assert "Goals: 2 met, 1 missed" in out  # 1.01 <= 1.05 met; 1.1 < 1.3 missed; M=8192 1.01 <= 1.08 met
    assert "[      MISSED] lowrank_linear: forward at M <= 16 >= 1.3x faster than the reference" in out


def test_gpu_check_is_a_subcommand_and_refuses_a_missing_out():
    """``share-kernels gpu-check`` is listed, its help names the report directory, and a call
    without ``--out`` is a one-line usage error with exit status 2."""
    proc, _ = cli("--help")
    assert proc.returncode == 0 and "gpu-check" in proc.stdout
    proc, _ = cli("gpu-check", "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout and "8-minute" in proc.stdout
    proc, _ = cli("gpu-check")
    assert proc.returncode == 2 and "--out" in proc.stderr


def test_import_is_light_and_load_registers_every_op():
    """``import share_kernels`` imports no torch; ``share_kernels.load()`` registers all five ops,
    the extension's project_complement pair included, so ``torch.ops.share_kernels.*`` resolve."""
    code = (
        "import sys, share_kernels\n"
        "assert 'torch' not in sys.modules\n"
        "share_kernels.load()\n"
        "import torch\n"
        "for n in ('lowrank_linear', 'multi_task_linear', 'stability_loss', 'project_complement',\n"
        "          'project_complement_grouped'):\n"
        "    getattr(torch.ops.share_kernels, n)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
