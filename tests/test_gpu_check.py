"""``share-kernels gpu-check --device cpu`` end to end (tiny shapes, kernels through the
interpreter): every phase runs, the reports are written and say what they must."""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_gpu_check_cpu_end_to_end(tmp_path):
    out = tmp_path / "gc"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SHARE_KERNELS_CPU_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # Two compiles stand for the plan (the whole set is compiled by tests/test_sm90_fit.py).
    proc = subprocess.run(
        [sys.executable, "-m", "share_kernels.cli", "gpu-check", "--device", "cpu", "--out", str(out),
         "--max-compiles", "2", "--jobs", "2"],
        capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT,
    )
    print(proc.stdout[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert rep["ok"] and rep["failures"] == []
    assert set(rep["phases"]) == {"build", "compile", "tests", "bench", "suites"}
    assert all(p["ok"] and p["seconds"] >= 0 for p in rep["phases"].values())
    for key in ("device", "date", "torch", "triton", "peft", "python"):
        assert rep["environment"][key]
    c = rep["compile"]
    assert c["target"] == "sm_90" and c["compiles"] == 2 and c["planned"] > 50 and c["not_fitting"] == []
    # every kernel in bf16, fp16 and fp32, and the fp16 overflow case, checked and passed
    checks = {t["check"] for t in rep["checks"] if t["ok"]}
    assert len(checks) == len(rep["checks"])
    for kernel in ("lowrank_linear", "multi_task_linear", "stability_loss", "project_complement"):
        for dt in ("bfloat16", "float16", "float32"):
            assert any(c.startswith(f"{kernel} {dt}") for c in checks), (kernel, dt)
    assert any("65504" in c for c in checks)
    # each goal row names its ratio, value and goal; the other suites ran (quick preset on CPU)
    assert rep["goals"] and all({"suite", "case", "ratio", "value", "goal", "met"} <= set(r) for r in rep["goals"])
    assert {r["suite"] for r in rep["goals"]} == {"lowrank_linear", "multi_task_linear"}
    assert {s["suite"] for s in rep["suites"]} == {"pslora", "inflora", "project_complement", "share"}
    assert all(s["ok"] for s in rep["suites"])
    for text in ("## Phases", "## Checks", "## Goals", "## Failures", rep["environment"]["device"], "<= 1.05"):
        assert text in md
