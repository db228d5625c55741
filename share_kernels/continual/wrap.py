"""Find the targeted ``nn.Linear`` layers of a model and replace them by a method's layer."""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .method import Method, get_method, make_config, method_of_config, method_of_layer

TargetModules = Union[str, Sequence[str]]

#: attribute under which :func:`wrap` records the method's config on the model (peft keeps
#: ``model.peft_config`` the same way); save, load, the learner and ``adapter_stats`` read it.
CONFIG_ATTR = "continual_config"


def _output_embedding_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except NotImplementedError:  # transformers' default for models without a head
        return None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def match_linear_layers(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the ``nn.Linear`` submodules that ``target_modules`` selects, in model order.

    ``target_modules``: a list of name suffixes (``"q_proj"`` matches ``"layers.0.attn.q_proj"``
    and ``"q_proj"``, not ``"xq_proj"``), a regex string matched against the whole name, or
    ``"all-linear"`` (every ``nn.Linear`` except the output head that ``get_output_embeddings()``
    names). Linears inside ``nn.MultiheadAttention`` are never candidates: it uses their weight
    without calling them. ValueError, naming the targets and the layers searched, when nothing
    matches.
    """
    inside_mha = {
        f"{p}.{c}".lstrip(".")
        for p, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and n not in inside_mha]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        head = _output_embedding_name(model)
        matched = [n for n in linears if n != head]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {e}") from None
        matched = [n for n in linears if pattern.fullmatch(n)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in target_modules):
        suffixes = tuple(target_modules)
        matched = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    else:
        raise TypeError(
            f"target_modules must be a list of name suffixes, a regex string or 'all-linear'; got {target_modules!r}"
        )
    if not matched:
        shown = ", ".join(linears[:12]) + (f", ... ({len(linears)} in all)" if len(linears) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear layer of {type(model).__name__}; "
            f"searched the nn.Linear layers: {shown or 'none'}"
        )
    return matched


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's adapter layers (of any registered method) by module name, in model order."""
    return {n: m for n, m in model.named_modules() if method_of_layer(m) is not None}


def model_method(model: nn.Module) -> tuple[type[Method], Any, dict[str, nn.Module]]:
    """(method class, config, layers) of a wrapped model; ValueError when it is not wrapped."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; wrap it first (share_kernels.wrap)")
    methods = {method_of_layer(m) for m in layers.values()}
    if len(methods) > 1:
        raise ValueError(f"the model mixes adapter layers of several methods: {sorted(m.name for m in methods)}")
    method = methods.pop()
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or method_of_config(config) is not method:
        config = method.config_cls()
    return method, config, layers


def replace_linears(model: nn.Module, layer_cls: type[nn.Module], kwargs_by_name: Mapping[str, dict]) -> None:
    """Replace each named ``nn.Linear`` by ``layer_cls.from_linear(linear, **kwargs)`` in place."""
    for name, kwargs in kwargs_by_name.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls.from_linear(getattr(parent, child), **kwargs))


def wrap(model: nn.Module, method: str, target_modules: TargetModules, **cfg) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by ``method``'s layer, in place.

    ``cfg`` builds the method's config dataclass (for Share: :class:`ShareConfig`). Every
    parameter of the model is frozen, as peft does; adapter parameters become trainable when a
    task is set. The config is recorded as ``model.continual_config``. Returns ``model``.
    """
    method_cls = get_method(method)
    config = make_config(method_cls, cfg)
    existing = adapter_layers(model)
    if existing:
        raise ValueError(
            f"the model is already wrapped ({len(existing)} adapter layers, e.g. {next(iter(existing))!r})"
        )
    kwargs = method_cls.layer_kwargs(config)
    replace_linears(model, method_cls.layer_cls, {n: kwargs for n in match_linear_layers(model, target_modules)})
    model.requires_grad_(False)
    setattr(model, CONFIG_ATTR, config)
    return model


@contextlib.contextmanager
def route_tasks(model: nn.Module, task_ids: torch.Tensor) -> Iterator[nn.Module]:
    """Within the block, every adapter layer of ``model`` runs its multi-task forward with
    ``task_ids`` (task ids in ``layer.tasks`` order, -1 = base model; shape ``x.shape[:-1]`` or
    one id per sequence, ``x.shape[:1]``), so one batch serves many tasks through a model whose
    forward does not take task ids. Inference only (use it under ``torch.no_grad()``)::

        with torch.no_grad(), route_tasks(model, torch.tensor([0, 2, -1])):
            logits = model(input_ids).logits
    """
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: (args, {**kwargs, "task_ids": task_ids}), with_kwargs=True
        )
        for layer in model_method(model)[2].values()
    ]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
