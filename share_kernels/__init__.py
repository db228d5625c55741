"""share_kernels: fused kernels and layers for continual low-rank adaptation.

``import share_kernels`` itself is light (no torch), so that the ``share-kernels`` command
starts fast; the first use of a public name (``share_kernels.wrap``, ``from share_kernels import
ShareLinear``) or the import of a submodule (``share_kernels.ops``, ``.nn``, ``.continual``)
imports torch and registers the ``torch.ops.share_kernels`` custom ops. It never touches a GPU.
Call :func:`load` to register the ops without naming anything.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first use, PEP 562)
_EXPORTS = {
    **dict.fromkeys(
        [
            "AdapterStats",
            "ConsolidationReport",
            "ContinualLearner",
            "InfLoRAConfig",
            "InfLoRAMethod",
            "PSLoRAConfig",
            "PSLoRAMethod",
            "ShareConfig",
            "adapter_stats",
            "from_peft_adapters",
            "init_subspace_from_lora",
            "load_adapters",
            "merge_adapter",
            "merge_and_unload",
            "save_adapters",
            "task_ids",
            "to_peft_adapter",
            "unload",
            "unmerge_adapter",
            "FrozenParameters",
            "base_state_dict",
            "from_pretrained",
            "save_pretrained",
            "set_task",
            "wrap",
        ],
        ".continual",
    ),
    **dict.fromkeys(["InfLoRALinear", "PSLoRALinear", "ShareLinear"], ".nn"),
    **dict.fromkeys(
        [
            "lowrank_linear",
            "lowrank_linear_reference",
            "multi_task_linear",
            "multi_task_linear_reference",
            "project_complement",
            "project_complement_grouped",
            "project_complement_reference",
            "stability_loss",
            "stability_loss_reference",
        ],
        ".ops",
    ),
}

__all__ = sorted(_EXPORTS) + ["__version__", "load"]


def load() -> None:
    """Import the whole API now (torch, the layers and the continual API) and register every
    ``torch.ops.share_kernels`` op, the extension's ``project_complement`` ops included (those
    otherwise appear on their first call: loading the extension may build it, see the README)."""
    for module in dict.fromkeys(_EXPORTS.values()):
        importlib.import_module(module, __name__)
    importlib.import_module(".ops.project_complement", __name__)._ensure_ops()


_SUBMODULES = ("bench", "cli", "continual", "harness", "integrations", "kernels", "nn", "ops")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .continual import (  # noqa: F401
        AdapterStats,
        ConsolidationReport,
        ContinualLearner,
        InfLoRAConfig,
        InfLoRAMethod,
        PSLoRAConfig,
        PSLoRAMethod,
        ShareConfig,
        adapter_stats,
        from_peft_adapters,
        init_subspace_from_lora,
        load_adapters,
        merge_adapter,
        merge_and_unload,
        save_adapters,
        task_ids,
        to_peft_adapter,
        unload,
        unmerge_adapter,
        FrozenParameters,
        base_state_dict,
        from_pretrained,
        save_pretrained,
        set_task,
        wrap,
    )
    from .nn import InfLoRALinear, PSLoRALinear, ShareLinear  # noqa: F401
    from .ops import (  # noqa: F401
        lowrank_linear,
        lowrank_linear_reference,
        multi_task_linear,
        multi_task_linear_reference,
        project_complement,
        project_complement_grouped,
        project_complement_reference,
        stability_loss,
        stability_loss_reference,
    )
