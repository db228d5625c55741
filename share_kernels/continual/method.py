"""The method interface behind :class:`~share_kernels.continual.ContinualLearner`, and its registry.

A method (Share, InfLoRA, PS-LoRA) is a :class:`Method` subclass registered with
:func:`register_method`; wrapping, the learner, save / load and ``adapter_stats`` only talk to
it through this interface, so adding a method touches none of them.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn

_METHODS: dict[str, type["Method"]] = {}


class ParamCounts(NamedTuple):
    """Per layer: parameters trained for one task, stored per task, and stored once for all."""

    trainable_per_task: int
    stored_per_task: int
    shared: int


class Method(abc.ABC):
    """A continual-learning method: its layer, its config, and its task-boundary hooks.

    Class attributes:
        name: the ``method=`` string.
        layer_cls: the module that replaces each targeted ``nn.Linear``. It keeps the linear as
            ``base_layer`` and provides ``from_linear(linear, **layer_kwargs(config))``,
            ``in_features``, ``out_features``, ``tasks`` (names in order), ``set_task(name | None)``,
            ``task_parameters(name)``, and for save / load ``adapter_config()`` (from_linear's
            JSON-able kwargs), ``shared_tensors()``, ``task_tensors(name)`` and
            ``load_adapter_state(shared, {task: tensors})`` (ValueError naming what does not fit).
        config_cls: a dataclass that validates itself in ``__post_init__``.

    Hooks, called by the learner after it has checked task names and ordering (one task in
    progress at a time, ``end_task`` names it):

    - ``begin_task(name, batches)``: add the task to every layer and make it the active, trainable
      one. ``batches`` is the user's iterable of model inputs or None; a method that needs data
      here (InfLoRA: input covariance, to design ``B_t``) runs the model on it itself
      (``self.model``, which the learner sets to the wrapped model).
    - ``trainable_parameters()``: what the optimizer updates for the task in progress.
    - ``extra_loss()``: a scalar the user adds to the task loss (PS-LoRA: stability loss); 0 here.
    - ``end_task(name, batches)``: the task-boundary algorithm (Share: consolidate the subspace;
      InfLoRA: update the gradient memory; PS-LoRA: magnitude merge); its return value (a report
      or None) is handed to the user.
    - ``set_task(name | None)``: the task the forward uses (None: the base model).
    - ``param_counts(d_in, d_out, config, layer=None)``: parameter accounting of one layer, for
      ``adapter_stats`` and the benchmark (``layer`` is None when only shapes are known).
    """

    name: ClassVar[str]
    layer_cls: ClassVar[type[nn.Module]]
    config_cls: ClassVar[type]
    #: the wrapped model, set by the learner (None until then)
    model: Optional[nn.Module] = None

    def __init__(self, layers: dict[str, nn.Module], config: Any):
        self.layers = layers
        self.config = config

    def check_layers_match(self, fields: dict[str, str]) -> None:
        """ValueError naming the first layer built with other values of these config fields
        (``{config field: layer attribute}``) than ``self.config`` has (e.g. a loaded model
        handed a different config)."""
        want = {f: getattr(self.config, f) for f in fields}
        for n, layer in self.layers.items():
            got = {f: getattr(layer, a) for f, a in fields.items()}
            if got != want:
                show = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
                raise ValueError(f"layer {n!r} was built with {show(got)}; the config says {show(want)}")

    @classmethod
    @abc.abstractmethod
    def layer_kwargs(cls, config: Any) -> dict:
        """Keyword arguments of ``layer_cls.from_linear`` taken from ``config``."""

    @classmethod
    def layer_kwargs_for(cls, config: Any, name: str) -> dict:
        """``layer_kwargs`` of the layer called ``name``: the same for every layer, plus
        ``out_slices`` where the config has a ``target_slices`` entry for it."""
        kw = cls.layer_kwargs(config)
        slices = slices_for(getattr(config, "target_slices", None), name)
        if slices is not None:
            kw["out_slices"] = slices
        return kw

    def check_slices_match(self) -> None:
        """ValueError naming a layer built with other ``out_slices`` than the config's
        ``target_slices`` gives it, or a ``target_slices`` key that matches no layer."""
        ts = getattr(self.config, "target_slices", None)
        for n, layer in self.layers.items():
            want = slices_for(ts, n)
            if getattr(layer, "out_slices", None) != want:
                raise ValueError(f"layer {n!r} was built with out_slices={layer.out_slices}; the config says {want}")
        check_slice_keys(self.config, list(self.layers))

    @classmethod
    @abc.abstractmethod
    def param_counts(cls, d_in: int, d_out: int, config: Any, layer: Optional[nn.Module] = None) -> ParamCounts:
        """One layer's accounting; ``layer`` is None when only its shape is known."""

    @abc.abstractmethod
    def begin_task(self, name: str, batches: Optional[Iterable] = None) -> None:
        """Add ``name`` to every layer and make it the active, trainable task."""

    @abc.abstractmethod
    def end_task(self, name: str, batches: Optional[Iterable] = None) -> Any:
        """The task-boundary algorithm; returns a report or None."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for layer in self.layers.values()
            for n, p in layer.named_parameters()
            if p.requires_grad and not n.startswith("base_layer.")
        ]

    def extra_loss(self) -> torch.Tensor:
        ref = next(iter(self.layers.values())).base_layer.weight
        return torch.zeros((), device=ref.device, dtype=torch.float32)

    def set_task(self, name: Optional[str]) -> None:
        for layer in self.layers.values():
            layer.set_task(name)


def _suffix(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def check_target_slices(ts: Any, where: str) -> Optional[dict]:
    """A config's ``target_slices``, ``{name suffix: [[start, stop], ...]}``, normalized (sorted
    lists); bounds are checked against each layer's d_out when it is wrapped."""
    from ..nn.common import check_out_slices

    if ts is None:
        return None
    if not isinstance(ts, dict) or not ts or not all(isinstance(k, str) and k for k in ts):
        raise ValueError(f"{where} must be a non-empty dict {{name suffix: [[start, stop], ...]}}; got {ts!r}")
    return {k: check_out_slices(v, None, f"{where}[{k!r}]") for k, v in ts.items()}


def check_slice_keys(config: Any, names: list[str]) -> None:
    """ValueError naming the ``target_slices`` keys of ``config`` that match none of ``names``."""
    ts = getattr(config, "target_slices", None) or {}
    unused = [k for k in ts if not any(_suffix(n, k) for n in names)]
    if unused:
        raise ValueError(f"target_slices: {unused} match no adapted layer (adapted: {names[:8]})")


def slices_for(ts: Optional[dict], name: str) -> Optional[list]:
    """The ``target_slices`` entry whose key is ``name`` or a dotted suffix of it (None: all rows)."""
    if not ts:
        return None
    hits = [k for k in ts if _suffix(name, k)]
    if len(hits) > 1:
        raise ValueError(f"target_slices: keys {hits} all match layer {name!r}")
    return ts[hits[0]] if hits else None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__qualname__})")
    if not dataclasses.is_dataclass(cls.config_cls):
        raise TypeError(f"{cls.__qualname__}.config_cls must be a dataclass")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are {sorted(_METHODS)}")
    return _METHODS[name]


def method_of_layer(layer: nn.Module) -> Optional[type[Method]]:
    for m in _METHODS.values():
        if isinstance(layer, m.layer_cls):
            return m
    return None


def method_of_config(config: Any) -> type[Method]:
    for m in _METHODS.values():
        if isinstance(config, m.config_cls):
            return m
    raise TypeError(f"{type(config).__name__} is not the config of a registered method")


def make_config(method: type[Method], cfg: dict) -> Any:
    """``method.config_cls(**cfg)``, naming the valid fields when a key is unknown."""
    fields = [f.name for f in dataclasses.fields(method.config_cls)]
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; valid options are {fields}")
    return method.config_cls(**cfg)
