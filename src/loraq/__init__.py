"""loraq: LoRA and QLoRA fine-tuning in pure PyTorch.

Public names only; see the README for a tour.
"""

from .batching.rows import adapter_rows
from .core.version import __version__ as __version__
from .generation.decode import SamplingParams, generate
from .io import (
    FormatError,
    export_gguf,
    export_merged,
    format_inspection,
    inspect_path,
    load_adapter,
    load_gguf,
    load_gguf_adapter,
    load_quantized,
    save_adapter,
    save_quantized,
)
from .layers.dropout import FastDropout, use_fast_dropout
from .layers.lora import LoRALayer, ModulesToSave
from .layers.qlora import QLoRALayer
from .model.combine import combine
from .model.config import LoraConfig
from .model.decompose import DecompositionReport, decompose
from .model.loftq import loftq_report
from .model.quantize import quantize_model
from .model.summary import Summary, summary
from .model.surgery import (
    active_adapter,
    adapter_names,
    adapter_state_dict,
    apply,
    config_of,
    delete_adapter,
    disable_adapters,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)

__all__ = [
    "FormatError",
    "export_gguf",
    "export_merged",
    "format_inspection",
    "inspect_path",
    "load_adapter",
    "load_gguf",
    "load_gguf_adapter",
    "load_quantized",
    "save_adapter",
    "save_quantized",
    "DecompositionReport",
    "SamplingParams",
    "adapter_rows",
    "generate",
    "FastDropout",
    "LoRALayer",
    "LoraConfig",
    "ModulesToSave",
    "QLoRALayer",
    "Summary",
    "active_adapter",
    "adapter_names",
    "adapter_state_dict",
    "apply",
    "combine",
    "config_of",
    "loftq_report",
    "quantize_model",
    "decompose",
    "delete_adapter",
    "disable_adapters",
    "merge",
    "set_adapter",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
    "use_fast_dropout",
]
