"""lightning_lora: parameter-efficient fine-tuning for PyTorch Lightning.

The core (config, targeting, methods, surgery, io) works on any ``nn.Module``; ``LoRACallback`` is the Lightning glue.
"""

from .atomic import ExportError, ExportTargetError
from .combine import add_weighted_adapter
from .config import AdapterConfig, BottleneckConfig, ConfigError, LoRAConfig
from .export import export_merged, merged_state_dict
from .fingerprint import base_fingerprint, compare_fingerprints
from .hotswap import hotswap_adapter
from .io import AdapterFileError, load_adapter, save_adapter
from .methods.base import MergeError
from .mixed import adapter_batch, clear_batch_adapters, set_batch_adapters
from .quantize import Int4Config, Int8Config, NF4Config, quantize_base
from .quantize_io import load_quantized
from .quantize_merge import MergeReport, merge_quantized, merged_quantized_state_dict
from .surgery import (
    active_adapters,
    adapter_names,
    adapter_state_dict,
    adapters,
    delete_adapter,
    set_active_adapters,
    disable_adapters,
    inject,
    merge,
    parameter_counts,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "BottleneckConfig",
    "ConfigError",
    "ExportError",
    "ExportTargetError",
    "Int4Config",
    "Int8Config",
    "LoRACallback",
    "LoRAConfig",
    "MergeError",
    "MergeReport",
    "NF4Config",
    "QuantizedPrecision",
    "active_adapters",
    "adapter_batch",
    "adapter_names",
    "adapter_state_dict",
    "adapters",
    "add_weighted_adapter",
    "delete_adapter",
    "set_active_adapters",
    "set_batch_adapters",
    "base_fingerprint",
    "clear_batch_adapters",
    "compare_fingerprints",
    "disable_adapters",
    "export_merged",
    "hotswap_adapter",
    "inject",
    "load_adapter",
    "load_quantized",
    "merge",
    "merge_quantized",
    "merged_quantized_state_dict",
    "merged_state_dict",
    "parameter_counts",
    "quantize_base",
    "save_adapter",
    "unload",
    "unmerge",
]


def __getattr__(name: str):
    # The callback imports Lightning; keep ``import lightning_lora`` light for core-only users.
    if name == "LoRACallback":
        from .callbacks import LoRACallback

        return LoRACallback
    if name == "QuantizedPrecision":
        from .plugins import QuantizedPrecision

        return QuantizedPrecision
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
