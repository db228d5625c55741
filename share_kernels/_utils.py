"""Small helpers shared by every layer of the package: backend choice and argument checks.

Nothing here queries a GPU at import time.
"""
from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes the Triton kernels take; float64 always runs the PyTorch reference.
TRITON_DTYPES = FLOAT_DTYPES


def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency on Linux
        return False
    return True


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (queried once per device, on first use)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs its Triton kernel.

    CUDA tensors of a Triton dtype always do. CPU tensors do only when the interpreter is on
    and ``SHARE_KERNELS_CPU_BACKEND=triton`` (the tests use this to run the kernels, their
    autograd and opcheck on a machine without a GPU); otherwise CPU runs the reference.
    """
    t = tensors[0]
    if t.dtype not in TRITON_DTYPES or not triton_available():
        return False
    if t.device.type == "cuda":
        return True
    return (
        t.device.type == "cpu"
        and triton_interpreting()
        and os.environ.get("SHARE_KERNELS_CPU_BACKEND", "reference") == "triton"
    )


def check_tensors(op: str, optional: tuple[str, ...] = (), **named) -> None:
    """TypeError unless every named argument is a ``torch.Tensor`` (None allowed for the names
    in ``optional``), so a list or a number fails here, named, not deep inside an op."""
    for name, t in named.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            what = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(f"{op}: {name} must be {what}; got {type(t).__name__}")


def check_flag(op: str, name: str, value, kind: type) -> None:
    """TypeError unless ``value`` is a ``kind`` (a bool flag, a str option)."""
    if not isinstance(value, kind):
        raise TypeError(f"{op}: {name} must be a {kind.__name__}; got {type(value).__name__} {value!r}")


def shape_str(t: torch.Tensor | None) -> str:
    return "None" if t is None else "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_float_dtypes(op: str, allowed=FLOAT_DTYPES + (torch.float64,), **tensors) -> torch.dtype:
    """All given tensors (None skipped) share one floating dtype from ``allowed``; TypeError if not."""
    named = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {k: v.dtype for k, v in named.items()}
    first = next(iter(dtypes.values()))
    if any(d != first for d in dtypes.values()):
        got = ", ".join(f"{k}={str(d).replace('torch.', '')}" for k, d in dtypes.items())
        raise TypeError(f"{op}: all inputs must have the same dtype; got {got}")
    if first not in allowed:
        ok = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: dtype {str(first).replace('torch.', '')} is not supported (use {ok})")
    return first


def check_same_device(op: str, **tensors) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in named.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        got = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device; got {got}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {what}; got {name} of shape {shape_str(t)}")


def cuda_matmul_allows_tf32() -> bool:
    """Whether fp32 CUDA matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32``), read
    without raising: torch >= 2.9 refuses the legacy flag once the per-backend ``fp32_precision``
    API has been used, and then that setting is read instead."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        prec = getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
        if prec == "none":
            prec = getattr(torch.backends, "fp32_precision", "ieee")
        return prec == "tf32"
