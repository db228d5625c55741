"""Find the targeted ``nn.Linear`` layers of a model and replace them by a method's layer."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..nn.common import BASE_TASK, is_adaptable, routed_task_ids
from .method import Method, check_slice_keys, get_method, make_config, method_of_config, method_of_layer

TargetModules = Union[str, Sequence[str]]

logger = logging.getLogger("share_kernels")

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
    """Names of the linear submodules that ``target_modules`` selects, in model order: ``nn.Linear``
    and transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``; weight stored
    transposed, peft's ``fan_in_fan_out``), as peft picks them.

    ``target_modules``: a list of name suffixes (``"q_proj"`` matches ``"layers.0.attn.q_proj"``
    and ``"q_proj"``, not ``"xq_proj"``), a regex string matched against the whole name, or
    ``"all-linear"`` (every such layer except the output head that ``get_output_embeddings()``
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
    linears = [n for n, m in model.named_modules() if is_adaptable(m) and n and n not in inside_mha]
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
            f"target_modules={target_modules!r} matched no nn.Linear or Conv1D layer of {type(model).__name__}; "
            f"searched the nn.Linear and Conv1D layers: {shown or 'none'}"
        )
    return matched


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's adapter layers (of any registered method) by module name, in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if method_of_layer(m) is not None}


def find_config(model: nn.Module) -> tuple[str, Any]:
    """``(where, config)``: the method config recorded on ``model`` (``where == ""``) or, when
    ``model`` has none, on the one submodule that has one (``where`` is its name).

    :func:`wrap` and ``load_adapters`` record the config on the module they were given, which
    may sit anywhere in a larger model (``wrap(model.bert, ...)``). ValueError, naming the
    modules searched, when there is none, or when submodules hold different configs.
    """
    own = getattr(model, CONFIG_ATTR, None)
    if own is not None:
        return "", own
    found = [
        (n, getattr(m, CONFIG_ATTR)) for n, m in model.named_modules() if getattr(m, CONFIG_ATTR, None) is not None
    ]
    if not found:
        n_sub = sum(1 for _ in model.modules()) - 1
        raise ValueError(
            f"no method config: looked for .{CONFIG_ATTR} on {type(model).__name__} and its {n_sub} submodules, "
            "found none. wrap() and load_adapters() record it on the module they were given: pass that module "
            "(or one that contains it), or wrap / load the model first"
        )
    if any(cfg != found[0][1] for _, cfg in found[1:]):
        shown = ", ".join(f"{n!r}: {cfg!r}" for n, cfg in found[:4])
        raise ValueError(
            f"{type(model).__name__} holds different method configs in its submodules ({shown}); "
            "pass the module whose config applies"
        )
    return found[0]


def model_method(model: nn.Module) -> tuple[type[Method], Any, dict[str, nn.Module]]:
    """(method class, config, layers) of a wrapped model; ValueError when it is not wrapped,
    when no config is recorded in its module tree (:func:`find_config`), or when the recorded
    config is not the layers' method's. A default config is never substituted."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapter layers; wrap it first (share_kernels.wrap)")
    methods = {method_of_layer(m) for m in layers.values()}
    if len(methods) > 1:
        raise ValueError(f"the model mixes adapter layers of several methods: {sorted(m.name for m in methods)}")
    method = methods.pop()
    where, config = find_config(model)
    if method_of_config(config) is not method:
        raise ValueError(
            f"the config recorded on {where or type(model).__name__!r} is a {type(config).__name__} (method "
            f"{method_of_config(config).name!r}), but the adapter layers are {method.name!r} layers"
        )
    return method, config, layers


def replace_linears(model: nn.Module, layer_cls: type[nn.Module], kwargs_by_name: Mapping[str, dict]) -> None:
    """Replace each named ``nn.Linear`` (or transformers ``Conv1D``) by
    ``layer_cls.from_linear(linear, **kwargs)`` in place."""
    for name, kwargs in kwargs_by_name.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls.from_linear(getattr(parent, child), **kwargs))


@dataclasses.dataclass(frozen=True)
class FrozenParameters:
    """What :func:`wrap` froze: the parameters that required grad before it and do not after.

    ``count`` tensors holding ``numel`` values in all; ``outside``: the names of those that are
    not in an adapted layer and, for a transformers model, not in its backbone
    (``model.base_model``): a task head. A model without ``base_model`` has no known backbone, so
    every frozen parameter outside the adapted layers is listed. ``kept``: parameters left
    trainable by ``keep_trainable``.
    """

    count: int
    numel: int
    outside: tuple[str, ...]
    kept: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"wrap froze {self.count} parameter tensors ({self.numel:,} values)"
        if self.kept:
            text += f"; kept trainable: {_some(self.kept)}"
        if self.outside:
            text += (
                f"; {len(self.outside)} of them are outside the base model's adapted layers and will not train: "
                f"{_some(self.outside)} (keep them trainable with keep_trainable=[module names])"
            )
        return text


def _some(names: Sequence[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _match_modules(model: nn.Module, patterns: TargetModules, arg: str) -> list[str]:
    """Names of the submodules ``patterns`` selects: name suffixes, or a regex on the whole name."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(patterns, str):
        try:
            rx = re.compile(patterns)
        except re.error as e:
            raise ValueError(f"{arg}={patterns!r} is not a valid regex: {e}") from None
        matched = [n for n in names if rx.fullmatch(n)]
    elif isinstance(patterns, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in patterns):
        matched = [n for n in names if any(n == s or n.endswith("." + s) for s in patterns)]
    else:
        raise TypeError(f"{arg} must be a list of module name suffixes or a regex string; got {patterns!r}")
    if not matched:
        raise ValueError(f"{arg}={patterns!r} matched no submodule of {type(model).__name__}")
    return matched


def _keep_modules(model: nn.Module, keep_trainable: Optional[TargetModules], adapted: Sequence[str]) -> list[str]:
    """The modules ``keep_trainable`` names; ValueError when one is, holds or sits in an adapted layer."""
    keep = [] if keep_trainable is None else _match_modules(model, keep_trainable, "keep_trainable")
    clash = [k for k in keep if _under(k, adapted) or any(_under(a, [k]) for a in adapted)]
    if clash:
        raise ValueError(
            f"keep_trainable={keep_trainable!r} selects {clash[:4]}, which hold adapted layers: their base "
            "weights stay frozen (the adapters are what trains)"
        )
    return keep


def freeze(model: nn.Module, adapted: Sequence[str], keep: Sequence[str], before: set[int]) -> FrozenParameters:
    """Freeze every parameter of ``model`` except those under the ``keep`` modules; report what
    changed. ``adapted``: the names of the adapted layers; ``before``: the ids of the parameters
    that required grad before wrapping."""
    kept = tuple(n for n, p in model.named_parameters() if _under(n, keep) and id(p) in before)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if n in kept:
            p.requires_grad_(True)
    frozen = [n for n, p in model.named_parameters() if id(p) in before and n not in kept]
    # transformers models name their backbone (``base_model``: the model itself when it has no head)
    base = getattr(model, "base_model", None)
    backbone = [n for n, m in model.named_modules() if isinstance(base, nn.Module) and m is base][:1]
    outside = tuple(n for n in frozen if not _under(n, adapted) and not _under(n, backbone))
    frozen_set = set(frozen)
    numel = sum(p.numel() for n, p in model.named_parameters() if n in frozen_set)
    return FrozenParameters(count=len(frozen), numel=numel, outside=outside, kept=kept)


def wrap_and_report(
    model: nn.Module,
    method: str,
    target_modules: TargetModules,
    keep_trainable: Optional[TargetModules] = None,
    **cfg: Any,
) -> FrozenParameters:
    """:func:`wrap`, returning what it froze (:class:`FrozenParameters`)."""
    method_cls = get_method(method)
    config = make_config(method_cls, cfg)
    existing = adapter_layers(model)
    if existing:
        raise ValueError(
            f"the model is already wrapped ({len(existing)} adapter layers, e.g. {next(iter(existing))!r})"
        )
    targets = match_linear_layers(model, target_modules)
    check_slice_keys(config, targets)
    keep = _keep_modules(model, keep_trainable, targets)  # bad names fail before the model changes
    before = {id(p) for p in model.parameters() if p.requires_grad}  # the layers freeze their base on wrapping
    replace_linears(model, method_cls.layer_cls, {n: method_cls.layer_kwargs_for(config, n) for n in targets})
    report = freeze(model, targets, keep, before)
    setattr(model, CONFIG_ATTR, config)
    logger.info("%s", report)
    if report.outside:
        warnings.warn(str(report), stacklevel=3)
    return report


def wrap(
    model: nn.Module,
    method: str,
    target_modules: TargetModules,
    *,
    keep_trainable: Optional[TargetModules] = None,
    **cfg: Any,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by ``method``'s layer, in place.

    ``cfg`` builds the method's config dataclass (for Share: :class:`ShareConfig`). Every
    parameter of the model is frozen, as peft does, except those under the modules that
    ``keep_trainable`` names (name suffixes or a regex, e.g. ``["classifier"]`` for a task
    head); adapter parameters become trainable when a task is set. What was frozen is logged
    (logger ``share_kernels``, INFO) and, when it includes trainable parameters outside the base
    model's adapted layers (a head), also warned about (:class:`FrozenParameters`). The config is
    recorded as ``model.continual_config``. Returns ``model``.
    """
    wrap_and_report(model, method, target_modules, keep_trainable, **cfg)
    return model



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

    The ids live in a context variable, not on the model: they reach the forwards that run in
    this thread (or asyncio task) inside the block and no others, so several threads may serve
    one model at once, each inside its own ``with task_ids(...)``.

    Unknown names and out-of-range ids raise ``ValueError`` here, once: the ids are read at
    entry (one sync for a GPU tensor, skipped during CUDA graph capture) and the layers then
    skip their per-call check. Tensor ids are used as they are, so a captured CUDA graph
    replays with whatever was copied into them.
    """
    layers = model_method(model)[2]
    for name, layer in layers.items():
        if not getattr(layer, "routes_task_ids", False):
            raise TypeError(f"task_ids: layer {name!r} ({type(layer).__name__}) has no multi-task forward")
    per_layer = _layer_ids(layers, ids)
    with routed_task_ids({layers[name]: t for name, t in per_layer.items()}):
        yield model
