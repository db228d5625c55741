"""The continual-learning API shared by all methods, and the methods' task-boundary algorithms.

``wrap`` / ``ContinualLearner`` (:mod:`.wrap`, :mod:`.learner`) dispatch to a registered
:class:`Method` (:mod:`.method`); ``save_adapters`` / ``load_adapters`` (:mod:`.io`) and
``adapter_stats`` (:mod:`.stats`) work for every method; ``save_pretrained`` /
``from_pretrained`` (:mod:`.pretrained`) add the base model to them, HF style. Share lives in
:mod:`.share`.
"""
from .inflora import DualGPM, InfLoRAConfig, InfLoRAMethod, InfLoRAReport
from .io import load_adapters, save_adapters
from .learner import ContinualLearner, set_task
from .merge import merge_adapter, merge_and_unload, unload, unmerge_adapter
from .method import Method, ParamCounts, get_method, register_method
from .peft_io import from_peft_adapters, to_peft_adapter
from .pretrained import base_state_dict, from_pretrained, save_pretrained
from .pslora import MergeReport, PSLoRAConfig, PSLoRAMethod, magnitude_merge
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
from .wrap import FrozenParameters, adapter_layers, find_config, match_linear_layers, task_ids, wrap

__all__ = [
    "AdapterStats",
    "ConsolidationReport",
    "ContinualLearner",
    "DualGPM",
    "FrozenParameters",
    "InfLoRAConfig",
    "InfLoRAMethod",
    "InfLoRAReport",
    "MergeReport",
    "Method",
    "PSLoRAConfig",
    "PSLoRAMethod",
    "ParamCounts",
    "ShareConfig",
    "ShareMethod",
    "adapter_layers",
    "adapter_stats",
    "base_state_dict",
    "build_subspace_from_lora",
    "consolidate",
    "consolidate_layer",
    "find_config",
    "from_pretrained",
    "from_peft_adapters",
    "get_method",
    "init_subspace_from_lora",
    "load_adapters",
    "magnitude_merge",
    "match_linear_layers",
    "merge_adapter",
    "merge_and_unload",
    "register_method",
    "save_adapters",
    "save_pretrained",
    "set_task",
    "task_ids",
    "to_peft_adapter",
    "unload",
    "unmerge_adapter",
    "wrap",
]
