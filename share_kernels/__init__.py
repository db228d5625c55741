"""share_kernels: fused kernels and layers for continual low-rank adaptation.

Importing registers the ``torch.ops.share_kernels`` custom ops; it never touches a GPU.
"""
from .continual import (
    AdapterStats,
    ConsolidationReport,
    ContinualLearner,
    ShareConfig,
    adapter_stats,
    init_subspace_from_lora,
    load_adapters,
    route_tasks,
    save_adapters,
    wrap,
)
from .nn import ShareLinear
from .ops import (
    lowrank_linear,
    lowrank_linear_reference,
    multi_task_linear_reference,
    project_complement,
    project_complement_grouped,
    project_complement_reference,
)

__version__ = "0.1.0"
__all__ = [
    "AdapterStats",
    "ConsolidationReport",
    "ContinualLearner",
    "ShareConfig",
    "ShareLinear",
    "adapter_stats",
    "init_subspace_from_lora",
    "load_adapters",
    "lowrank_linear",
    "lowrank_linear_reference",
    "multi_task_linear_reference",
    "project_complement",
    "project_complement_grouped",
    "project_complement_reference",
    "route_tasks",
    "save_adapters",
    "wrap",
    "__version__",
]
