"""Modules: a frozen ``nn.Linear`` kept as ``base_layer`` plus a method's adapters."""
from .share_linear import ShareLinear

__all__ = ["ShareLinear"]
