"""One file per op: schema, input checks, fake kernel, autograd, reference, dispatch."""
from .lowrank_linear import lowrank_linear, lowrank_linear_reference
from .multi_task_linear import multi_task_linear, multi_task_linear_reference
from .project_complement import project_complement, project_complement_grouped, project_complement_reference
from .stability_loss import stability_loss, stability_loss_reference

# Autocast rules, one place for every op (project_complement's op is registered lazily, with them).
from . import _autocast  # noqa: E402

for _name, _policy in (
    ("lowrank_linear", "lower"),
    ("multi_task_linear", "lower"),
    ("stability_loss", "fp32"),
    ("stability_loss_and_grad", "fp32"),
):
    _autocast.register(_name, _policy)

__all__ = [
    "lowrank_linear",
    "lowrank_linear_reference",
    "multi_task_linear",
    "multi_task_linear_reference",
    "project_complement",
    "project_complement_grouped",
    "project_complement_reference",
    "stability_loss",
    "stability_loss_reference",
]
