"""share_kernels: fused kernels and layers for continual low-rank adaptation.

Importing registers the ``torch.ops.share_kernels`` custom ops; it never touches a GPU.
"""
from .ops import lowrank_linear, lowrank_linear_reference

__version__ = "0.1.0"
__all__ = ["lowrank_linear", "lowrank_linear_reference", "__version__"]
