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

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(
    HAS_CUDA, reason="TRITON_INTERPRET is process-wide; with CUDA present the kernels are tested on the GPU instead"
)


@pytest.fixture
def triton_cpu(monkeypatch):
    """Route the ops' CPU path through the Triton kernels (interpreter) for this test."""
    monkeypatch.setenv("SHARE_KERNELS_CPU_BACKEND", "triton")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
