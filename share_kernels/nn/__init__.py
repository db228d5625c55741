"""Modules: a frozen ``nn.Linear`` kept as ``base_layer`` plus a method's adapters."""
from ._cache import clear_forward_cache
from .inflora_linear import InfLoRALinear
from .pslora_linear import PSLoRALinear
from .share_linear import ShareLinear, set_merged_inference

__all__ = ["InfLoRALinear", "PSLoRALinear", "ShareLinear", "clear_forward_cache", "set_merged_inference"]
