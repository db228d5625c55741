"""Test setup. Without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET must
be set before anything imports triton, so it happens here, first."""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


if not HAS_CUDA:
    # bf16 as the GPU computes it (dots widened to fp32, round-to-nearest-even casts).
    from share_kernels.kernels.interpreter import patch_bf16  # noqa: E402

    patch_bf16()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(
    HAS_CUDA, reason="TRITON_INTERPRET is process-wide; with CUDA present the kernels are tested on the GPU instead"
)


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of CUDA carries the ``cuda`` marker, so ``pytest -m cuda`` (the
    GPU check's selection) cannot silently miss one."""
    unmarked = [
        item.nodeid
        for item in items
        if any(m.name == "skipif" and m.kwargs.get("reason") == requires_cuda.kwargs["reason"] for m in item.iter_markers())
        and item.get_closest_marker("cuda") is None
    ]
    if unmarked:
        raise pytest.UsageError("CUDA tests without the `cuda` marker: " + ", ".join(unmarked))


@pytest.fixture
def triton_cpu(monkeypatch):
    """Route the ops' CPU path through the Triton kernels (interpreter) for this test."""
    monkeypatch.setenv("SHARE_KERNELS_CPU_BACKEND", "triton")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """A test must leave the process as it found it: grad mode and autocast are per thread, and
    one left off (a no_grad held across an await, say) silently changes every later test."""
    yield
    assert torch.is_grad_enabled(), "the test left grad mode disabled"
    assert not torch.is_autocast_enabled("cpu"), "the test left CPU autocast enabled"
