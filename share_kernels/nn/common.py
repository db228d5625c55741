"""Helpers shared by the adapter layers."""
from __future__ import annotations

import contextlib
import contextvars
import re
import sys
import threading
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ._cache import forward_cache

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
# Task names key nn.ParameterDicts, which cannot hold a key that shadows one of their methods.
_RESERVED = frozenset(n for n in dir(nn.ParameterDict) if not n.startswith("_"))


#: longest task name: it is part of a file name (``task-<name>.safetensors``, 255 bytes at most)
MAX_TASK_NAME = 100
#: the name ``task_ids`` reads as "no task, the base model" (peft's ``adapter_names``)
BASE_TASK = "__base__"


def check_task_name(name: str) -> None:
    """Task names key parameters and name files: 1 to 100 letters, digits, ``_`` and ``-``
    (not first), so never a path separator; not ``__base__`` (``task_ids``' name for no task)."""
    if not isinstance(name, str):
        raise TypeError(f"invalid task name {name!r}: a task name must be a str, got {type(name).__name__}")
    if len(name) > MAX_TASK_NAME:
        raise ValueError(f"invalid task name {name[:20]!r}...: {len(name)} characters, at most {MAX_TASK_NAME}")
    if not _TASK_NAME.fullmatch(name):
        raise ValueError(
            f"invalid task name {name!r}: use 1 to {MAX_TASK_NAME} letters, digits, '_' and '-' (not as the first "
            "character); no path separators"
        )
    if name == BASE_TASK:
        raise ValueError(f"invalid task name {name!r}: task_ids uses it for the base model")
    if name in _RESERVED:
        raise ValueError(f"invalid task name {name!r}: it is reserved (a method of nn.ParameterDict)")


def conv1d_class():
    """``transformers.pytorch_utils.Conv1D`` if transformers is loaded, else None. A model can only
    hold a Conv1D once that module is imported, so this never imports transformers itself."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): a linear layer
    whose weight is stored transposed, (d_in, d_out) -- peft's ``fan_in_fan_out=True``."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_adaptable(module: nn.Module) -> bool:
    """The layers the adapters wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear``, a Conv1D (weight (d_in, d_out)) or an adapter layer."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


_BASE = "base_layer."


def _base_keys_to_original_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>base_layer.<name>`` -> ``<prefix><name>``, in place and in order."""
    base = prefix + _BASE
    if not any(k.startswith(base) for k in state_dict):
        return
    items = list(state_dict.items())
    renamed = {prefix + k[len(base) :] if k.startswith(base) else k for k, _ in items}
    if len(renamed) != len(items):  # an adapter tensor named like a base one: refuse rather than overwrite
        raise ValueError(
            f"{type(module).__name__} at {prefix[:-1]!r}: adapter state names collide with the base layer's"
        )
    state_dict.clear()
    for k, v in items:
        state_dict[prefix + k[len(base) :] if k.startswith(base) else k] = v


def _original_names_to_base_keys(
    module: nn.Module, state_dict: dict, prefix: str, *_: object
) -> None:
    """load_state_dict pre-hook: the inverse of :func:`_base_keys_to_original_names` for the
    base layer's own state names (a state dict that still says ``base_layer.`` loads too)."""
    for name in [n for n, _ in module.base_layer.state_dict().items()]:
        key = prefix + name
        if key in state_dict and prefix + _BASE + name not in state_dict:
            state_dict[prefix + _BASE + name] = state_dict.pop(key)


# Per-forward task ids (``share_kernels.task_ids``): ``{layer: ids}`` in a context variable, so
# each thread (and each asyncio task) sees only the ids its own ``with task_ids(...)`` set;
# two requests served at once on one model never see each other's ids.
_ROUTED: contextvars.ContextVar[Mapping[nn.Module, Tensor]] = contextvars.ContextVar(
    "share_kernels_task_ids", default={}
)


# How many routed_task_ids blocks are open, in any thread. While none is, current_task_ids returns
# None without reading the context variable: torch.compile cannot trace ContextVar.get, but it
# guards on this global, so a compiled forward (fullgraph too) stays one graph when no routing is
# in use, and is re-traced, with a graph break at the read, while some block is open: never stale.
_OPEN_BLOCKS = 0
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def routed_task_ids(per_layer: Mapping[nn.Module, Tensor]) -> Iterator[None]:
    """Within the block, in this thread / context only, ``current_task_ids(layer)`` returns
    ``per_layer[layer]`` (ids already checked); nested blocks override per layer."""
    global _OPEN_BLOCKS
    with _OPEN_LOCK:
        _OPEN_BLOCKS += 1
    token = _ROUTED.set({**_ROUTED.get(), **per_layer})
    try:
        yield
    finally:
        _ROUTED.reset(token)
        with _OPEN_LOCK:
            _OPEN_BLOCKS -= 1


def current_task_ids(layer: nn.Module) -> Optional[Tensor]:
    """The task ids a ``routed_task_ids`` block of this context set for ``layer``, or None."""
    if _OPEN_BLOCKS == 0:
        return None
    return _ROUTED.get().get(layer)


class TaskLayer(nn.Module):
    """Task bookkeeping shared by the adapter layers: names in order (``self._tasks``), the
    base ``nn.Linear`` as ``self.base_layer``, and frozen parameters on its device and dtype.

    ``state_dict()`` names the base layer's tensors as the unwrapped model did (``q.weight``, not
    ``q.base_layer.weight``), so a wrapped model's checkpoint (``save_pretrained``,
    ``Trainer.save_model``) loads into the plain model class as the base model, the adapter
    tensors (``q.U``, ``q.eps_a.<task>``, ...) reported as unused; ``load_state_dict`` maps
    the names back, so a wrapped model's state still round-trips through its own state dict.
    """

    _tasks: list[str]
    base_layer: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_base_keys_to_original_names)
        self.register_load_state_dict_pre_hook(_original_names_to_base_keys)

    #: True when ``base_layer`` is a transformers ``Conv1D`` (weight stored (d_in, d_out))
    fan_in_fan_out: bool = False

    def _init_base(self, base_layer: nn.Module, owner: str) -> None:
        """Keep ``base_layer`` (frozen) and read d_in, d_out from it: an ``nn.Linear`` or a Conv1D."""
        if not is_adaptable(base_layer):
            raise TypeError(f"{owner} wraps an nn.Linear or a transformers Conv1D; got {type(base_layer).__name__}")
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        d0, d1 = base_layer.weight.shape
        self.in_features, self.out_features = (d0, d1) if self.fan_in_fan_out else (d1, d0)

    def base_weight(self) -> Tensor:
        """The base weight as (d_out, d_in), as ``F.linear`` takes it (a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    @property
    def tasks(self) -> list[str]:
        """Task names in the order added; a name's index is its task id."""
        return list(self._tasks)

    def task_id(self, name: str) -> int:
        self._check_known(name)
        return self._tasks.index(name)

    def _check_known(self, name: str) -> None:
        if name not in self._tasks:
            raise ValueError(f"unknown task {name!r}; this layer has tasks {self._tasks}")

    def _check_new(self, name: str) -> None:
        check_task_name(name)
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; tasks are {self._tasks}")

    def _new_param(self, t: Tensor) -> nn.Parameter:
        """A frozen copy of ``t`` on the base weight's device and dtype (never aliasing ``t``)."""
        w = self.base_layer.weight
        return nn.Parameter(t.detach().to(device=w.device, dtype=w.dtype).clone(), requires_grad=False)


# ------------------------------------------------------------------ output slices of a fused projection


def check_out_slices(out_slices, d_out: Optional[int], where: str = "InfLoRALinear") -> Optional[list[list[int]]]:
    """``out_slices`` as sorted, disjoint ``[start, stop]`` lists within [0, d_out] (None: all rows;
    ``d_out`` None: no upper bound yet); ValueError naming the slice and d_out otherwise."""
    if out_slices is None:
        return None
    if isinstance(out_slices, (str, bytes)) or not isinstance(out_slices, Sequence) or not out_slices:
        raise ValueError(f"{where}: out_slices must be a non-empty list of [start, stop] pairs; got {out_slices!r}")
    out = []
    for sl in out_slices:
        ok = isinstance(sl, Sequence) and len(sl) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in sl)
        if not ok or not 0 <= sl[0] < sl[1] or (d_out is not None and sl[1] > d_out):
            bound = "" if d_out is None else f" <= d_out={d_out}"
            raise ValueError(f"{where}: out_slices entry {sl!r} must be [start, stop] ints with 0 <= start < stop{bound}")
        out.append([int(sl[0]), int(sl[1])])
    out.sort()
    for a, b in zip(out, out[1:]):
        if b[0] < a[1]:
            raise ValueError(f"{where}: out_slices {a} and {b} overlap")
    return out


def slice_index(out_slices: Optional[list[list[int]]], device) -> Optional[Tensor]:
    """Row indices of several slices (None for no slices or one: that one is a view)."""
    if out_slices is None or len(out_slices) == 1:
        return None
    return torch.cat([torch.arange(a, b) for a, b in out_slices]).to(device)


def take_rows(t: Tensor, out_slices: Optional[list[list[int]]], index: Optional[Tensor]) -> Tensor:
    """The adapted rows of ``t`` (d_out, ...): ``t`` itself, a view (one slice) or a gather."""
    if out_slices is None:
        return t
    if index is None:
        a, b = out_slices[0]
        return t[a:b]
    return t.index_select(0, index.to(t.device))


def base_rows(layer: nn.Module) -> Tensor:
    """The adapted rows of ``layer``'s base weight (d_out or n_a, d_in): the weight itself or a
    view (no slice, one slice); with several slices the gathered rows, kept in the layer's
    forward cache while the base weight is unchanged (the gather, n_a x d_in, is not repeated
    every forward; the copy costs what a folded or merged weight of those rows costs)."""
    w = layer.base_weight()
    if layer._out_index is None:
        return take_rows(w, layer.out_slices, None)
    # the parameter as the source, not base_weight()'s view: a Conv1D's .t() is new every call
    return forward_cache(layer).get(
        "base_rows", (layer.base_layer.weight,), None, lambda: take_rows(w, layer.out_slices, layer._out_index)
    )


def expand_rows(d: Tensor, out_slices: Optional[list[list[int]]], index: Optional[Tensor], d_out: int) -> Tensor:
    """The adapted rows ``d`` (n_a, ...) placed in a (d_out, ...) tensor of zeros (``d`` itself
    without slices): the inverse of :func:`take_rows` for an update."""
    if out_slices is None:
        return d
    out = d.new_zeros((d_out,) + tuple(d.shape[1:]))
    if index is None:
        a, b = out_slices[0]
        out[a:b] = d
        return out
    return out.index_copy_(0, index.to(out.device), d)


def overwrite_rows(y: Tensor, ya: Tensor, out_slices: list[list[int]], index: Optional[Tensor]) -> Tensor:
    """``y`` (..., d_out) with its adapted columns replaced by ``ya`` (..., n_a); every other
    column is ``y``'s, bit for bit."""
    ya = ya.to(y.dtype)
    if index is None:
        a, e = out_slices[0]
        return torch.cat([y[..., :a], ya, y[..., e:]], -1)
    return y.index_copy(y.dim() - 1, index.to(y.device), ya)
