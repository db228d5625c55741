"""Autocast rules of the custom ops, in one place: each op follows ``torch.autocast`` the way
the aten op it stands for does.

* ``"lower"`` (``lowrank_linear``, ``multi_task_linear``: the ``F.linear`` family): inside an
  autocast region on the inputs' device, every floating input except float64 is cast to the
  region's dtype (``torch.get_autocast_dtype``: fp16 or bf16, CPU or CUDA), then the op runs
  with autocast off. The casts are ordinary differentiable ``.to`` calls, so gradients reach
  fp32 parameters (adapters, masters) in their own dtype.
* ``"fp32"`` (``stability_loss``, ``project_complement``: a loss and a projection, like the
  losses and linear algebra autocast keeps in fp32): floating inputs are cast to float32.

``torch.library.register_autocast`` casts to one dtype fixed at registration, so it cannot
follow a region's fp16 / bf16 choice; these kernels read it per call.
"""
from __future__ import annotations

import collections.abc

import torch

_DEVICES = ("cpu", "cuda")
_lib = torch.library.Library("share_kernels", "IMPL")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        ok = value.is_floating_point() and value.device.type == device_type and value.dtype is not torch.float64
        return value.to(dtype) if ok else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def register(name: str, policy: str) -> None:
    """Register ``share_kernels::<name>``'s autocast kernels (CPU and CUDA) with ``policy``."""
    if policy not in ("lower", "fp32"):
        raise ValueError(f"autocast policy must be 'lower' or 'fp32'; got {policy!r}")
    op = getattr(torch.ops.share_kernels, name).default
    for device_type in _DEVICES:
        if not torch.amp.is_autocast_available(device_type):  # pragma: no cover
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key):
            continue

        def kernel(_keyset, *args, _dev=device_type, _key=key, **kwargs):
            dtype = torch.get_autocast_dtype(_dev) if policy == "lower" else torch.float32
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))):
                return op(*_cast(args, _dev, dtype), **_cast(kwargs, _dev, dtype))

        _lib.impl(name, kernel, key, with_keyset=True)
