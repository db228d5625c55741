"""pytest-benchmark view of the lowrank_linear suite (same cases as ``share-kernels bench``).

    pytest benchmarks/bench_lowrank_linear.py --benchmark-group-by=group
    SHARE_KERNELS_BENCH_PRESET=full pytest benchmarks/bench_lowrank_linear.py   # the issue's shapes
"""
import os

import pytest
import torch

from share_kernels.bench.common import sync
from share_kernels.bench.lowrank_linear import IMPLS, MODES, case_fn, make_case, shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("SHARE_KERNELS_BENCH_PRESET", "quick")
MS, D, KS, DTYPE, _ = shapes(DEVICE, PRESET)


@pytest.fixture(scope="module")
def cases():
    return {}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("k", KS)
def test_lowrank_linear(benchmark, cases, impl, mode, M, k):
    if (M, k) not in cases:
        cases[(M, k)] = make_case(M, D, k, DTYPE, DEVICE)
    sets, peft = cases[(M, k)]
    if impl == "peft" and peft[0] is None:
        pytest.skip("peft is not installed (pip install -e '.[bench]')")
    fn = case_fn(impl, mode, sets, peft)
    benchmark.group = f"{mode} M={M} k={k} {DTYPE}"

    def step():
        fn()
        sync(DEVICE)

    benchmark(step)
