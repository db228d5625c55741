"""share_kernels: fused kernels and layers for continual low-rank adaptation.

Importing registers the ``torch.ops.share_kernels`` custom ops; it never touches a GPU.
"""
from .continual import (
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
    save_adapters,
    task_ids,
    to_peft_adapter,
    wrap,
)
from .nn import InfLoRALinear, PSLoRALinear, ShareLinear
from .ops import (
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

__version__ = "0.1.0"
__all__ = [
    "AdapterStats",
    "ConsolidationReport",
    "ContinualLearner",
    "InfLoRAConfig",
    "InfLoRALinear",
    "InfLoRAMethod",
    "PSLoRAConfig",
    "PSLoRALinear",
    "PSLoRAMethod",
    "ShareConfig",
    "ShareLinear",
    "adapter_stats",
    "from_peft_adapters",
    "init_subspace_from_lora",
    "load_adapters",
    "lowrank_linear",
    "lowrank_linear_reference",
    "multi_task_linear",
    "multi_task_linear_reference",
    "project_complement",
    "project_complement_grouped",
    "project_complement_reference",
    "save_adapters",
    "stability_loss",
    "stability_loss_reference",
    "task_ids",
    "to_peft_adapter",
    "wrap",
    "__version__",
]
