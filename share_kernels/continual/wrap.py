"""Find the targeted ``nn.Linear`` layers of a model and replace them by a method's layer."""
from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .method import Method, check_slice_keys, get_method, make_config, method_of_config, method_of_layer

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
    names = match_linear_layers(model, target_modules)
    check_slice_keys(config, names)
    replace_linears(model, method_cls.layer_cls, {n: method_cls.layer_kwargs_for(config, n) for n in names})
    model.requires_grad_(False)
    setattr(model, CONFIG_ATTR, config)
    return model


#: the task name that means "no task, the base model" in :func:`task_ids` (as peft's ``adapter_names``)
BASE_TASK = "__base__"

TaskIds = Union[torch.Tensor, Sequence[Any]]


def _names_to_ids(names: Any, layer: nn.Module, where: str) -> Any:
    """Nested lists of task names -> the same nesting of this layer's ids (-1 for ``__base__``)."""
    if isinstance(names, str):
        return -1 if names == BASE_TASK else layer.task_id(names)
    if isinstance(names, (list, tuple)):
        return [_names_to_ids(n, layer, where) for n in names]
    raise TypeError(f"task_ids: {where} must hold task names (str, {BASE_TASK!r} for none); got {names!r}")


def _layer_ids(layers: Mapping[str, nn.Module], ids: TaskIds) -> dict[str, torch.Tensor]:
    """Each layer's id tensor on its device, built (and range-checked) once."""
    from ..ops.multi_task_linear import check_task_id_values

    cache: dict[Any, torch.Tensor] = {}
    out = {}
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"task_ids: ids must be an integer tensor; got {str(ids.dtype).replace('torch.', '')}")
        if not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            check_task_id_values(ids, min(len(layer.tasks) for layer in layers.values()))
        for name, layer in layers.items():
            dev = layer.base_layer.weight.device
            if dev not in cache:
                cache[dev] = ids if ids.device == dev else ids.to(dev)
            out[name] = cache[dev]
        return out
    if isinstance(ids, str) or not isinstance(ids, (list, tuple)):
        raise TypeError(f"task_ids: ids must be an integer tensor or a list of task names; got {type(ids).__name__}")
    for name, layer in layers.items():
        key = (tuple(layer.tasks), layer.base_layer.weight.device)
        if key not in cache:
            cache[key] = torch.tensor(_names_to_ids(ids, layer, "ids"), dtype=torch.long, device=key[1])
        out[name] = cache[key]
    return out


@contextlib.contextmanager
def task_ids(model: nn.Module, ids: TaskIds) -> Iterator[nn.Module]:
    """Within the block, every adapter layer of ``model`` runs its multi-task forward
    (:func:`~share_kernels.multi_task_linear`), so one batch serves many tasks through a model
    whose forward does not take task ids. Inference only (use it under ``torch.no_grad()``).

    ``ids``: an integer tensor of task ids in ``layer.tasks`` order (-1 = base model), or (nested)
    lists of task names with ``"__base__"`` for the base model, as peft's ``adapter_names``;
    names are converted per layer with ``layer.task_id(name)``. Shape ``x.shape[:-1]`` (per
    token) or ``x.shape[:1]`` (per sequence)::

        with torch.no_grad(), task_ids(model, ["cola", "__base__", "rte"]):
            logits = model(input_ids).logits

    Unknown names and out-of-range ids raise ``ValueError`` here, once: the ids are read at
    entry (one sync for a GPU tensor, skipped during CUDA graph capture) and the layers then
    skip their per-call check. Tensor ids are used as they are, so a captured CUDA graph
    replays with whatever was copied into them.
    """
    layers = model_method(model)[2]
    extra = {}
    for name, layer in layers.items():
        params = inspect.signature(layer.forward).parameters
        if "task_ids" not in params:
            raise TypeError(f"task_ids: layer {name!r} ({type(layer).__name__}) has no multi-task forward")
        extra[name] = {"check_ids": False} if "check_ids" in params else {}  # checked once, above
    per_layer = _layer_ids(layers, ids)
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, _kw={"task_ids": per_layer[name], **extra[name]}: (args, {**kwargs, **_kw}),
            with_kwargs=True,
        )
        for name, layer in layers.items()
    ]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
