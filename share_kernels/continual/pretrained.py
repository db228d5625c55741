"""HF-style checkpoints of a wrapped model: the base model next to its adapter files.

``save_pretrained(model, dir)`` writes, as peft's ``PeftModel.save_pretrained`` does for an
adapter plus its base model reference:

- the base model: for a transformers model its own ``save_pretrained`` (``config.json``,
  ``model.safetensors``) with the base weights alone, under the unwrapped model's names, so
  ``AutoModel...from_pretrained(dir)`` loads it as the plain base model; for any other module
  ``model.safetensors`` with the same base state dict;
- the adapters: :func:`~share_kernels.save_adapters`' files (``share_config.json``,
  ``shared.safetensors``, ``task-<name>.safetensors``);
- ``share_base.json``, written last: the base model's class and ``name_or_path``.

``from_pretrained(model_or_id, dir)`` reads them back: the base weights (checked name by name
against the model) and then the adapters through :func:`~share_kernels.load_adapters`.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from .io import atomic_write, load_adapters, save_adapters
from .wrap import adapter_layers, model_method

BASE_FILE = "share_base.json"
BASE_FORMAT = "share_kernels.pretrained"
BASE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the adapter tensors: the base model's state under the
    unwrapped model's names (an adapter layer's ``base_layer.weight`` is ``weight`` there)."""
    layers = adapter_layers(model)
    own = {n: set(layer.base_layer.state_dict()) for n, layer in layers.items()}
    out = {}
    for key, value in model.state_dict().items():
        layer = next((n for n in layers if key.startswith(n + ".")), None)
        if layer is None or key[len(layer) + 1 :] in own[layer]:
            out[key] = value
    return out


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def save_pretrained(
    model: nn.Module, directory: Union[str, os.PathLike], tasks: Optional[Sequence[str]] = None, **hf_kwargs: Any
) -> None:
    """Write the wrapped ``model`` to ``directory``: base model, adapters, base reference.

    ``tasks``: which tasks get a file (default all; see :func:`~share_kernels.save_adapters`).
    ``hf_kwargs`` go to a transformers model's ``save_pretrained`` (e.g. ``max_shard_size``).
    The folder loads back with :func:`from_pretrained`; a transformers folder also loads the plain
    way (``BertModel.from_pretrained(dir)``) as the base model.
    """
    directory = os.fspath(directory)
    model_method(model)  # a wrapped model with its config, before anything is written
    save_adapters(model, directory, tasks)
    state = base_state_dict(model)
    hf = _is_transformers_model(model)
    if hf:
        model.save_pretrained(directory, state_dict=state, **hf_kwargs)
    else:
        if hf_kwargs:
            raise TypeError(
                f"save_pretrained: {sorted(hf_kwargs)} are for transformers models; got a {type(model).__name__}"
            )
        # clone: safetensors refuses tensors that share storage (tied weights); each key gets its own copy
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        atomic_write(os.path.join(directory, WEIGHTS_FILE), save(tensors, metadata={"format": "pt"}))
    config = getattr(model, "config", None)
    ref = {
        "format": BASE_FORMAT,
        "version": BASE_VERSION,
        "base_class": _class_path(model),
        "transformers": hf,
        "base_name_or_path": getattr(config, "_name_or_path", None) or None,
    }
    atomic_write(os.path.join(directory, BASE_FILE), json.dumps(ref, indent=2).encode())


def _read_ref(directory: str) -> dict:
    path = os.path.join(directory, BASE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {BASE_FILE}; it was not written by share_kernels.save_pretrained")
    with open(path) as f:
        ref = json.load(f)
    if ref.get("format") != BASE_FORMAT or ref.get("version") != BASE_VERSION:
        raise ValueError(
            f"{path}: expected format {BASE_FORMAT!r} version {BASE_VERSION}; got {ref.get('format')!r} "
            f"version {ref.get('version')!r}"
        )
    return ref


def _transformers_class(ref: dict) -> type:
    """The recorded base class, imported only from the transformers package."""
    module, _, name = ref["base_class"].rpartition(".")
    if not ref.get("transformers") or not (module == "transformers" or module.startswith("transformers.")):
        raise ValueError(
            f"the base model is a {ref['base_class']}, not a transformers class: pass an instance of it, "
            "from_pretrained(MyModel(...), directory)"
        )
    from transformers import PreTrainedModel

    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"{ref['base_class']} is not a transformers PreTrainedModel class")
    return cls


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        bad = [s for s in shards if os.path.basename(s) != s]
        if bad:
            raise ValueError(f"{index}: shard names must be file names in the folder; got {bad[:4]}")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX}): the base weights are missing")
    return load_file(path)


def _load_base(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load base weights strictly: every base key of ``model`` is set (a weight tied to one that
    is set counts as set), nothing is left over; ValueError naming the keys otherwise."""
    own = base_state_dict(model)
    unexpected = sorted(set(state) - set(own))
    missing = []
    present = {(v.data_ptr(), v.shape, v.stride()) for k, v in own.items() if k in state}
    for k, v in own.items():
        if k not in state and (v.data_ptr(), v.shape, v.stride()) not in present:
            missing.append(k)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the base weights do not fit {type(model).__name__}: missing {sorted(missing)[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {k!r}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; never load silently wrong
        raise ValueError(f"{where}: unexpected keys {result.unexpected_keys[:8]}")


def from_pretrained(
    model_or_id: Union[nn.Module, str, os.PathLike],
    directory: Optional[Union[str, os.PathLike]] = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a folder written by :func:`save_pretrained`; returns the wrapped model, base active.

    ``model_or_id``: the base model, either an instance of the saved class (wrapped or not; its
    weights are replaced) or, for a transformers model, a name or path that the recorded class's
    ``from_pretrained`` loads (``hf_kwargs`` go there). ``directory``: the folder (default:
    ``model_or_id`` when that is a path). The base weights saved there are loaded, every name
    checked against the model, then the adapters (:func:`~share_kernels.load_adapters`). Pick a
    task with :func:`~share_kernels.set_task`.
    """
    if directory is None:
        if not isinstance(model_or_id, (str, os.PathLike)):
            raise TypeError("from_pretrained: directory is required when model_or_id is a model instance")
        directory = model_or_id
    directory = os.fspath(directory)
    ref = _read_ref(directory)
    if isinstance(model_or_id, nn.Module):
        if hf_kwargs:
            raise TypeError(f"from_pretrained: {sorted(hf_kwargs)} are for loading a transformers model by name")
        model = model_or_id
        if _class_path(model) != ref["base_class"]:
            raise ValueError(f"{directory!r} holds a {ref['base_class']}; got a {_class_path(model)}")
        _load_base(model, _read_weights(directory), directory)
    elif isinstance(model_or_id, (str, os.PathLike)):
        source = os.fspath(model_or_id)
        model = _transformers_class(ref).from_pretrained(source, **hf_kwargs)
        if os.path.abspath(source) != os.path.abspath(directory):  # the saved base weights win
            _load_base(model, _read_weights(directory), directory)
    else:
        raise TypeError(
            f"from_pretrained: model_or_id must be an nn.Module or a name / path; got {type(model_or_id).__name__}"
        )
    load_adapters(model, directory)
    return model
