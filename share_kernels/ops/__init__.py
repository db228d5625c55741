"""One file per op: schema, input checks, fake kernel, autograd, reference, dispatch."""
from .lowrank_linear import lowrank_linear, lowrank_linear_reference
from .multi_task_linear import multi_task_linear_reference

__all__ = ["lowrank_linear", "lowrank_linear_reference", "multi_task_linear_reference"]
