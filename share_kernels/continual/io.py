"""Save and load a wrapped model's adapters: safetensors plus a JSON config, never pickle.

A directory holds

- ``share_config.json``: format version, method, the method's config, per layer its
  ``in_features`` / ``out_features``, the kwargs that rebuild it and its tensor shapes, the task
  names in task-id order, and the id of the subspace (a hash of the shared tensors);
- ``shared.safetensors``: what all tasks share (Share: ``<layer>.U``, ``<layer>.V``);
- ``task-<name>.safetensors``: one task's own part (Share: ``<layer>.eps_a``, ``<layer>.eps_b``,
  a few KB), so a task ships as one small file.

Every file is written to a temporary name and renamed into place, the config last; each file
carries the subspace id, so task files saved against other bases, or a save torn between
files, are refused at load instead of silently mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..nn.common import is_adaptable, layer_features
from .method import get_method, make_config
from .wrap import CONFIG_ATTR, adapter_layers, model_method, replace_linears

FORMAT = "share_kernels.adapters"
FORMAT_VERSION = 1
CONFIG_FILE = "share_config.json"
SHARED_FILE = "shared.safetensors"


def task_file(name: str) -> str:
    return f"task-{name}.safetensors"


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk, rename it to ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # safetensors' save() to bytes, not save_file(): save_file creates files readable by the owner alone.
    atomic_write(path, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata))


def _subspace_id(shared: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(shared):
        t = shared[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _model_tasks(layers: dict[str, nn.Module]) -> list[str]:
    lists = {name: layer.tasks for name, layer in layers.items()}
    first_name, first = next(iter(lists.items()))
    for name, tasks in lists.items():
        if tasks != first:
            raise ValueError(f"layers disagree on the tasks: {first_name!r} has {first}, {name!r} has {tasks}")
    return first


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {CONFIG_FILE}; it was not written by save_adapters")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}; got {cfg.get('format')!r} "
            f"version {cfg.get('version')!r}"
        )
    return cfg


def save_adapters(model: nn.Module, directory: str, tasks: Optional[Sequence[str]] = None) -> None:
    """Write the adapters of a wrapped ``model`` to ``directory`` (created if needed).

    ``tasks``: which tasks get a file (default all). A task saved earlier in the directory stays
    listed when its file was saved against the same shared tensors; one that no longer fits is
    dropped from the listing with a warning (its file is left alone).
    """
    method, config, layers = model_method(model)
    model_tasks = _model_tasks(layers)
    tasks = list(model_tasks if tasks is None else tasks)
    unknown = [t for t in tasks if t not in model_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the model has tasks {model_tasks}")
    shared = {f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.shared_tensors().items()}
    per_task = {
        t: {f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.task_tensors(t).items()} for t in tasks
    }
    sid = _subspace_id(shared)
    os.makedirs(directory, exist_ok=True)

    kept: list[str] = []
    if os.path.exists(os.path.join(directory, CONFIG_FILE)):
        previous = _read_config(directory)
        listed = [t for t in previous["tasks"] if t not in tasks]
        if previous["method"] == method.name and previous["subspace"] == sid:
            kept = listed
        elif listed:
            warnings.warn(
                f"{directory}: task files {[task_file(t) for t in listed]} were saved against other shared tensors "
                "and are no longer listed",
                stacklevel=2,
            )
    order = [t for t in model_tasks if t in tasks or t in kept] + [t for t in kept if t not in model_tasks]

    meta = {"format": FORMAT, "method": method.name, "subspace": sid}
    for t, tensors in per_task.items():
        _save_tensors(os.path.join(directory, task_file(t)), tensors, {**meta, "task": t})
    shared_path = os.path.join(directory, SHARED_FILE)
    if _file_subspace(shared_path) != sid:  # unchanged bases are not rewritten: a new task ships alone
        _save_tensors(shared_path, shared, meta)
    # Every task of a layer has the same tensor shapes; any task of the model shows them.
    shape_task = model_tasks[0] if model_tasks else None
    cfg = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": method.name,
        "config": dataclasses.asdict(config),
        "subspace": sid,
        "tasks": order,
        "layers": {
            n: {
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "layer_config": layer.adapter_config(),
                "shared": {k: list(v.shape) for k, v in layer.shared_tensors().items()},
                "task": (
                    None
                    if shape_task is None
                    else {k: list(v.shape) for k, v in layer.task_tensors(shape_task).items()}
                ),
            }
            for n, layer in layers.items()
        },
    }
    atomic_write(os.path.join(directory, CONFIG_FILE), json.dumps(cfg, indent=2).encode())


def _split(
    tensors: dict[str, torch.Tensor], layer_shapes: dict[str, dict], where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<layer>.<tensor>": t}`` -> ``{layer: {tensor: t}}``, checked against ``layer_shapes``."""
    expected = {f"{n}.{k}": tuple(s) for n, shapes in layer_shapes.items() for k, s in shapes.items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: missing tensors {missing[:8]}, unexpected tensors {extra[:8]}")
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layer_shapes}
    for n, shapes in layer_shapes.items():
        for k in shapes:
            t = tensors[f"{n}.{k}"]
            if tuple(t.shape) != expected[f"{n}.{k}"]:
                raise ValueError(
                    f"{where}: layer {n!r}, tensor {k!r}: expected shape {expected[f'{n}.{k}']}, got {tuple(t.shape)}"
                )
            out[n][k] = t
    return out


def _file_subspace(path: str) -> Optional[str]:
    """The subspace id a safetensors file was saved against; None when there is no such file."""
    if not os.path.exists(path):
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("subspace")


def _read_tensors(path: str, sid: str, where: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise ValueError(f"{where}: file {path} is missing")
    found = _file_subspace(path)
    if found != sid:
        raise ValueError(
            f"{where}: {os.path.basename(path)} was saved against other shared tensors (subspace "
            f"{found!r}, the config says {sid!r})"
        )
    return load_file(path)


def load_adapters(model: nn.Module, directory: str) -> list[str]:
    """Load adapters saved by :func:`save_adapters` into ``model``; returns the task names.

    An unwrapped model is wrapped first (the saved layer names, the saved config); a wrapped one
    must have the same layers, built the same way. Everything is checked before anything is
    changed: a missing or unexpected layer or tensor, a shape that does not fit (named with the
    expected and found shapes), or a task file from other bases raises ValueError. The loaded
    tasks replace the model's; the base model is active afterwards.
    """
    cfg = _read_config(directory)
    method = get_method(cfg["method"])
    config = make_config(method, cfg["config"])
    saved = cfg["layers"]
    layers = adapter_layers(model)
    modules = dict(model.named_modules())
    if layers:
        missing, extra = sorted(set(saved) - set(layers)), sorted(set(layers) - set(saved))
        if missing or extra:
            raise ValueError(
                f"adapter layers differ: saved but not in the model {missing}, in the model but not saved {extra}"
            )
    for n, spec in saved.items():
        m = modules.get(n)
        if m is None or not (is_adaptable(m) or isinstance(m, method.layer_cls)):
            kinds = f"nn.Linear, Conv1D or {method.layer_cls.__name__}"
            raise ValueError(f"layer {n!r}: the model has no {kinds} by that name")
        if layer_features(m) != (spec["in_features"], spec["out_features"]):
            raise ValueError(
                f"layer {n!r}: expected in_features={spec['in_features']}, out_features={spec['out_features']}; "
                f"got {', '.join(map(str, layer_features(m)))}"
            )
        if layers and m.adapter_config() != spec["layer_config"]:
            raise ValueError(
                f"layer {n!r}: saved with {spec['layer_config']}, the model's layer has {m.adapter_config()}"
            )
    in_model = _model_tasks(layers) if layers else []
    stray = [t for t in in_model if t not in cfg["tasks"]]
    if stray:
        raise ValueError(f"the model holds tasks {stray} that {directory!r} lacks; they would not fit the loaded bases")

    sid = cfg["subspace"]
    shared = _split(
        _read_tensors(os.path.join(directory, SHARED_FILE), sid, SHARED_FILE),
        {n: spec["shared"] for n, spec in saved.items()},
        SHARED_FILE,
    )
    per_task = {
        t: _split(
            _read_tensors(os.path.join(directory, task_file(t)), sid, task_file(t)),
            {n: spec["task"] for n, spec in saved.items()},
            task_file(t),
        )
        for t in cfg["tasks"]
    }

    if not layers:
        replace_linears(model, method.layer_cls, {n: spec["layer_config"] for n, spec in saved.items()})
        model.requires_grad_(False)
        layers = adapter_layers(model)
    for n, layer in layers.items():
        try:
            layer.load_adapter_state(shared[n], {t: per_task[t][n] for t in cfg["tasks"]})
        except ValueError as e:
            raise ValueError(f"layer {n!r}: {e}") from None
    setattr(model, CONFIG_ATTR, config)
    return list(cfg["tasks"])
