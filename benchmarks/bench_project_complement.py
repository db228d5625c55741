"""pytest-benchmark view of the project_complement suite (same cases as ``share-kernels bench``).

    pytest benchmarks/bench_project_complement.py --benchmark-group-by=group
    SHARE_KERNELS_BENCH_PRESET=full pytest benchmarks/bench_project_complement.py   # the issue's shapes
"""
import os

import pytest
import torch

from share_kernels.bench.common import sync
from share_kernels.bench.project_complement import (
    CPU_MAX_FLOP,
    GROUP_IMPLS,
    IMPLS,
    case_fn,
    make_case,
    make_group_case,
    shapes,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("SHARE_KERNELS_BENCH_PRESET", "quick")
SINGLE, DTYPES, GROUPS = shapes(DEVICE, PRESET)


@pytest.fixture(scope="module")
def cases():
    return {}


def _bench(benchmark, fn, group):
    benchmark.group = group

    def step():
        fn()
        sync(DEVICE)

    with torch.no_grad():
        benchmark(step)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,n,k", SINGLE)
def test_project_complement(benchmark, cases, impl, dtype, d, n, k):
    if DEVICE.type == "cpu" and 4.0 * d * n * k > CPU_MAX_FLOP:
        pytest.skip(f"{4.0 * d * n * k / 1e12:.1f} TFLOP per call: too slow on CPU")
    key = (d, n, k, dtype)
    if key not in cases:
        cases.clear()  # one shape's inputs at a time: the largest are GBs
        cases[key] = make_case(d, n, k, dtype, DEVICE)
    _bench(benchmark, case_fn(impl, cases[key]), f"d={d} n={n} k={k} {dtype}")


@pytest.mark.parametrize("impl", list(GROUP_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layers,d,n,k", GROUPS)
def test_project_complement_grouped(benchmark, cases, impl, dtype, layers, d, n, k):
    key = ("grouped", layers, d, n, k, dtype)
    if key not in cases:
        cases.clear()
        cases[key] = make_group_case(layers, d, n, k, dtype, DEVICE)
    _bench(benchmark, case_fn(impl, cases[key]), f"grouped {layers}x d={d} n={n} k={k} {dtype}")
