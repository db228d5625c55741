"""The adapter layers' forward cache: operands derived from adapter tensors, kept between calls
while nothing trains and rebuilt when anything they come from changes.

**When a layer caches.** A derived operand (Share's ``C = scale·(eps_a eps_bᵀ)Vᵀ`` and the stacked
cores of a mixed batch, InfLoRA's concatenated branches, PS-LoRA's scaled ``Bᵀ``) is cached
unless a gradient could flow into it in this call, i.e. unless **grad mode is on and one of the
tensors it is computed from requires grad**. So ``torch.no_grad()``, ``torch.inference_mode()``,
or a model whose adapter tensors are all frozen (no task selected for training) use the cache; a
training forward recomputes the operand with its graph every call, as before.

**When an entry is stale.** An entry records, for each source tensor: the tensor object itself
(identity, not ``id()``: a new tensor at a recycled address never matches), a detached view of
its data (keeping that storage alive, so its address cannot be reused while the entry lives) and
its version counter ``t._version`` (bumped by every in-place op: optimizer steps, ``copy_``,
``load_state_dict``). It also records the layer state the operand depends on (active task, task
list, scale) and the autocast state (on or off, and its dtype, per device). Any difference rebuilds the entry: an optimizer step, ``set_task``, ``end_task`` /
consolidation (new tensors), ``load_adapters`` (new tensors), ``.to(dtype / device)`` (new data
under the same parameter). Not seen: in-place writes through ``t.data`` (``.data`` has its own
version counter); after such a write call :func:`clear_forward_cache`.

**Threads.** An entry is one immutable tuple, read once and replaced whole by a single dict
assignment (atomic under the GIL), so a thread sees either the old entry or the new one, never a
mix. Two threads that miss at once both compute; either result is correct.

Under ``torch.compile`` the cache is bypassed (the compiled graph computes the operand).

The cache holds small tensors (k x d and smaller), except the gathered base-weight rows of a
layer adapted on several output slices (n_a x d_in, ``nn.common.base_rows``); it is not module state (no
``state_dict`` entry, not moved by ``.to``: a moved layer just rebuilds it) and a copy of the
layer (``copy.deepcopy``) starts with an empty one.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

T = TypeVar("T")

_ATTR = "_forward_cache"


class ForwardCache:
    """Named slots, each ``(sources, views, versions, state, value)``; see the module doc."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[str, tuple] = {}

    def get(self, slot: str, sources: Sequence[Tensor], state: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``'s value, cached in ``slot`` while ``sources`` and ``state`` are unchanged.

        ``sources``: every tensor ``compute`` reads; ``state``: every other input (names,
        scale). Without caching (grad mode on and a source requires grad) ``compute()`` runs
        as it is, keeping its graph.
        """
        if torch.compiler.is_compiling():
            # a traced graph recomputes the operand itself (and guards on what it reads); a
            # Python-side cache inside it would be baked in or break the graph
            return compute()
        sources = tuple(sources)
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return compute()
        # a value computed inside an autocast region has the region's dtype: never serve it outside
        state = (state, _autocast_state(sources))
        entry = self._slots.get(slot)
        if entry is not None and _fresh(entry, sources, state):
            return entry[4]
        versions = tuple(t._version for t in sources)
        # inference_mode(False): a value built inside inference_mode would be an inference
        # tensor, which a later forward with autograd on could not save for backward.
        with torch.inference_mode(False), torch.no_grad():
            views = tuple(t.detach() for t in sources)
            value = compute()
        self._slots[slot] = (sources, views, versions, state, value)
        return value

    @staticmethod
    def usable(sources: Sequence[Tensor]) -> bool:
        """Whether :meth:`get` would cache for these sources now (see the module doc)."""
        if torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))

    def clear(self) -> None:
        self._slots = {}

    def __deepcopy__(self, memo) -> "ForwardCache":
        return ForwardCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state) -> None:
        self._slots = {}


def _autocast_state(sources: tuple) -> tuple:
    """(device type, autocast on, its dtype) for each device the sources live on."""
    devices = sorted({t.device.type for t in sources})
    return tuple(
        (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None)
        for d in devices
    )


def _fresh(entry: tuple, sources: tuple, state: Hashable) -> bool:
    old, views, versions, old_state, _ = entry
    if len(old) != len(sources) or old_state != state:
        return False
    for a, b, v, ver in zip(old, sources, views, versions):
        if a is not b or b._version != ver or b.data_ptr() != v.data_ptr():
            return False
    return True


def forward_cache(module: nn.Module) -> ForwardCache:
    """``module``'s cache, created on first use (``setdefault``: two threads get the same one)."""
    cache = module.__dict__.get(_ATTR)
    if cache is None:
        cache = module.__dict__.setdefault(_ATTR, ForwardCache())
    return cache


def clear_forward_cache(module: nn.Module) -> None:
    """Drop the cached operands of every adapter layer in ``module`` (e.g. after writing a
    parameter through ``.data``, which version counters do not see)."""
    for m in module.modules():
        cache = m.__dict__.get(_ATTR)
        if cache is not None:
            cache.clear()


def gemm_layout(U: Tensor) -> Tensor:
    """``U`` (d_in, k) as the same values with k-major storage (a transposed view of a
    contiguous (k, d_in) tensor) on a CPU, else ``U`` itself.

    Why: ``x @ U`` with a skinny U is a GEMM whose narrow operand CPU BLAS reads far faster
    along d_in: measured 2-3x faster for d_in = 384 / 1536, k = 8 on this project's CPU, the
    layout peft's ``F.linear(x, lora_A.weight)`` has. Cached like any operand, it is paid once.
    """
    if U.device.type != "cpu" or U.dim() != 2 or U.stride(0) == 1:
        return U
    return U.t().contiguous().t()
