"""Fold a task's update into the base weights, and take the adapters out: peft's names and meaning.

- :func:`merge_adapter` ``(model, task)``: every adapter layer's base weight becomes
  ``W + dW_task`` and the layer runs its base layer alone (no update added twice).
- :func:`unmerge_adapter` ``(model)``: the base weights are restored **bit for bit** (the merge
  keeps a copy of each base weight it changes, so the error left is exactly zero; the cost is
  one base weight per adapted layer while merged), and the merged task is active again.
- :func:`merge_and_unload` ``(model, task)``: merge, then replace every adapter layer by its
  base layer: a plain model (``nn.Linear`` / ``Conv1D``) with the task built in.
- :func:`unload` ``(model)``: the base model, adapters dropped (unmerged first if merged).

What ``dW_task`` is, per method (the update the layer's forward adds with ``task`` active):

- Share: ``scale · V eps_b eps_aᵀ Uᵀ`` (with the training task's extras, if any);
- InfLoRA: ``Σ_{i ≤ task} A_i B_i``, every branch up to the task (class-incremental);
- PS-LoRA: the merged history ``prev_delta``, plus ``scale · B A`` when ``task`` is the task still
  in training.

The update is formed and added in float32 (the weight's dtype if wider) and rounded once to the
weight's dtype, so merged outputs equal the unmerged task's within that dtype's rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..nn.common import current_task_ids, expand_rows
from .wrap import CONFIG_ATTR, adapter_layers

#: attribute of a merged layer: the task merged into its base weight
MERGED_ATTR = "merged_task"
_BACKUP_ATTR = "_merge_backup"
_HOOK_ATTR = "_merge_hook"


def task_delta(layer: nn.Module, task: str) -> Tensor:
    """The update (d_out, d_in) that ``layer``'s forward adds with ``task`` active, float32 or wider."""
    layer._check_known(task)
    w = layer.base_layer.weight
    acc = torch.promote_types(w.dtype, torch.float32)
    with torch.no_grad():
        if hasattr(layer, "prev_delta"):  # PS-LoRA: the history, plus the LoRA still in training
            delta = layer.prev_delta.to(acc).clone()  # (n_a, d_in): the adapted rows only
            if task == layer.training_task:
                A, B = layer.lora_A[task].to(acc), layer.lora_B[task].to(acc)
                delta += layer.scale * (B @ A)
            return expand_rows(delta, layer.out_slices, layer._out_index, layer.out_features)
        if hasattr(layer, "lora_B"):  # InfLoRA: every branch up to the task
            return layer.delta_weight(task).to(acc)
        A, B = layer.task_factors(task)  # Share
        return layer.scale * (B.to(acc) @ A.to(acc).t())


def _refuse_while_merged(module, args, kwargs):
    routed = kwargs.get("task_ids") is not None or current_task_ids(module) is not None
    if routed or module.active_task is not None:
        raise RuntimeError(
            f"task {getattr(module, MERGED_ATTR)!r} is merged into the base weights; unmerge_adapter(model) "
            "before selecting a task or passing task_ids"
        )


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; wrap it first (share_kernels.wrap)")
    return layers


def _merged(layers: dict[str, nn.Module]) -> Optional[str]:
    return next((getattr(m, MERGED_ATTR) for m in layers.values() if getattr(m, MERGED_ATTR, None)), None)


def merge_adapter(model: nn.Module, task: Optional[str] = None, *, safe_merge: bool = False) -> nn.Module:
    """Fold ``task``'s update into every adapter layer's base weight, in place; returns ``model``.

    ``task`` defaults to the active task (one task set on every layer). The layers then run
    their base layer alone; selecting a task or using ``task_ids`` raises until
    :func:`unmerge_adapter`. ``safe_merge``: check the merged weights for NaN / inf before
    writing any (ValueError naming the layer). ValueError if a task is merged already.
    """
    layers = _layers(model)
    already = _merged(layers)
    if already is not None:
        raise ValueError(f"task {already!r} is already merged; unmerge_adapter(model) first")
    if task is None:
        active = {m.active_task for m in layers.values()}
        if len(active) != 1 or None in active:
            raise ValueError(f"merge_adapter: name a task (the layers' active tasks are {sorted(map(str, active))})")
        task = active.pop()
    for n, layer in layers.items():
        if task not in layer.tasks:
            raise ValueError(f"unknown task {task!r}; layer {n!r} has tasks {layer.tasks}")
    merged = {}
    for n, layer in layers.items():
        w = layer.base_layer.weight
        delta = task_delta(layer, task)
        new = (w.detach().to(delta.dtype) + (delta.t() if layer.fan_in_fan_out else delta)).to(w.dtype)
        if safe_merge and not bool(torch.isfinite(new).all()):
            raise ValueError(f"merge_adapter: layer {n!r}: merging task {task!r} gives NaN or infinite weights")
        merged[n] = new
    for n, layer in layers.items():
        w = layer.base_layer.weight
        setattr(layer, _BACKUP_ATTR, w.detach().clone())
        with torch.no_grad():
            w.copy_(merged[n])
        layer.set_task(None)
        setattr(layer, MERGED_ATTR, task)
        setattr(layer, _HOOK_ATTR, layer.register_forward_pre_hook(_refuse_while_merged, with_kwargs=True))
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Restore the base weights saved by :func:`merge_adapter` exactly and make the merged task
    active again; returns ``model``. A no-op when nothing is merged."""
    layers = _layers(model)
    task = _merged(layers)
    if task is None:
        return model
    for layer in layers.values():
        if getattr(layer, MERGED_ATTR, None) is None:
            continue
        with torch.no_grad():
            layer.base_layer.weight.copy_(getattr(layer, _BACKUP_ATTR))
        getattr(layer, _HOOK_ATTR).remove()
        for a in (MERGED_ATTR, _BACKUP_ATTR, _HOOK_ATTR):
            delattr(layer, a)
        layer.set_task(task)
    return model


def _replace_by_base(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    for name, layer in layers.items():
        for a in (MERGED_ATTR, _BACKUP_ATTR):
            if hasattr(layer, a):
                delattr(layer, a)
        if hasattr(layer, _HOOK_ATTR):
            getattr(layer, _HOOK_ATTR).remove()
            delattr(layer, _HOOK_ATTR)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def merge_and_unload(model: nn.Module, task: Optional[str] = None, *, safe_merge: bool = False) -> nn.Module:
    """Merge ``task`` (default: the active task) and replace every adapter layer by its base
    layer; returns ``model``, now a plain model with no adapter modules. A task merged already
    by :func:`merge_adapter` is kept when ``task`` is None or names it."""
    layers = _layers(model)
    already = _merged(layers)
    if already is not None and task not in (None, already):
        raise ValueError(f"task {already!r} is merged, not {task!r}; unmerge_adapter(model) first")
    if already is None:
        merge_adapter(model, task, safe_merge=safe_merge)
    return _replace_by_base(model, layers)


def unload(model: nn.Module) -> nn.Module:
    """The base model: every adapter layer replaced by its base layer with its original weight
    (a merged task is unmerged first); returns ``model``."""
    layers = _layers(model)
    unmerge_adapter(model)
    return _replace_by_base(model, layers)


__all__ = ["merge_adapter", "merge_and_unload", "task_delta", "unload", "unmerge_adapter"]
