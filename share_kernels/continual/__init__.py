"""The continual-learning API shared by all methods, and the methods' task-boundary algorithms.

``wrap`` / ``ContinualLearner`` (:mod:`.wrap`, :mod:`.learner`) dispatch to a registered
:class:`Method` (:mod:`.method`); ``save_adapters`` / ``load_adapters`` (:mod:`.io`) and
``adapter_stats`` (:mod:`.stats`) work for every method. Share lives in :mod:`.share`.
"""
from .io import load_adapters, save_adapters
from .learner import ContinualLearner
from .method import Method, ParamCounts, get_method, register_method
from .share import (
    ConsolidationReport,
    ShareConfig,
    ShareMethod,
    build_subspace_from_lora,
    consolidate,
    consolidate_layer,
    init_subspace_from_lora,
)
from .stats import AdapterStats, adapter_stats
from .wrap import adapter_layers, match_linear_layers, route_tasks, wrap

__all__ = [
    "AdapterStats",
    "ConsolidationReport",
    "ContinualLearner",
    "Method",
    "ParamCounts",
    "ShareConfig",
    "ShareMethod",
    "adapter_layers",
    "adapter_stats",
    "build_subspace_from_lora",
    "consolidate",
    "consolidate_layer",
    "get_method",
    "init_subspace_from_lora",
    "load_adapters",
    "match_linear_layers",
    "register_method",
    "route_tasks",
    "save_adapters",
    "wrap",
]
