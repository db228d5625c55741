"""The benchmarks' performance model (share_kernels/bench/model.py) and the vs_peft suite."""

import pytest
import torch

from share_kernels.bench import SUITES
from share_kernels.bench import model as perf


def test_lowrank_linear_counts():
    M, d_in, d_out, k = 16, 4096, 1024, 64
    c = perf.lowrank_linear(M, d_in, d_out, k, elt=2)
    assert c.flops == 2 * M * d_in * d_out + 2 * M * d_in * k + 2 * M * k * d_out
    # x, W, bias, U, C read once, y written once, 2 bytes each
    assert c.bytes == 2 * (M * d_in + d_out * d_in + d_out + d_in * k + k * d_out + M * d_out)


def test_bound_is_the_larger_of_compute_and_memory_time():
    decode = perf.lowrank_linear(1, 4096, 4096, 16)  # ~32 MB of weight, ~34 MFLOP
    assert decode.bound_by("H100") == "memory"
    assert decode.bound_s("H100") == pytest.approx(decode.bytes / 3.35e12)
    assert decode.bound_s("H200") == pytest.approx(decode.bytes / 4.8e12)
    prefill = perf.lowrank_linear(8192, 4096, 4096, 16)
    assert prefill.bound_by("H100") == "compute"
    assert prefill.bound_s("H100") == pytest.approx(prefill.flops / 989e12)
    fp32 = perf.linear(8192, 4096, 4096, elt=4)  # no tensor cores for plain fp32
    assert fp32.bound_s("H100") == pytest.approx(fp32.flops / 67e12)


def test_costs_add_and_scale():
    a = perf.linear(8, 16, 32)
    b = perf.covariance(8, 16, elt=2)
    s = (a + b).times(3)
    assert s.flops == 3 * (a.flops + b.flops) and s.bytes == 3 * (a.bytes + b.bytes)


def test_columns_print_the_model_alone_off_an_h100_or_h200():
    cols = perf.columns(perf.multi_task_linear(256, 4096, 4096, 32, 1024), 1.0, torch.device("cpu"))
    assert {"model GFLOP", "model MB", "H100 bound us", "H200 bound us", "bound by"} <= set(cols)
    assert not any(k.startswith("of ") for k in cols)
    assert cols["H200 bound us"] <= cols["H100 bound us"]


def test_vs_peft_suite_is_registered_and_runs_quick():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from share_kernels.bench import vs_peft

    assert SUITES["vs_peft"] == "share_kernels.bench.vs_peft"
    rows = vs_peft.run(torch.device("cpu"), "quick", echo=lambda *a: None)
    cases = [r["case"] for r in rows]
    for kind in ("train", "train fused-AdamW", "train big-batch", "infer"):
        for v in ("peft lora", "share k=8", "share k=32", "inflora", "pslora"):
            assert f"{kind} {v}" in cases
    assert "infer share k=32 merged" in cases and "train pslora no loss" in cases
    assert "mixed T=4 share k=8" in cases and "mixed T=4 peft lora" in cases
    for r in rows:
        assert r["ms"] > 0 and r["vs peft"] > 0 and r["model GFLOP"] > 0 and r["H100 bound us"] > 0
        if r["case"].endswith("peft lora"):
            assert r["vs peft"] == 1.0


def test_goal_rows_relate_each_kernel_to_its_baseline():
    rows = perf.goal_rows("H100")
    by = {(r["kernel"], r["case"]): r for r in rows}
    # decode: the ideal fused kernel moves W plus U and C, so its bound is a little above F.linear's
    assert 1.0 < by[("lowrank_linear fwd", "M=1 k=64")]["model ratio"] < 1.05
    # memory-bound projection: one read of X and one write against the three-kernel form
    assert by[("project_complement", "d=4096 n=65536 k=16")]["model ratio"] < 0.5
    assert by[("project_complement", "d=4096 n=65536 k=2048")]["bound by"] == "compute"
