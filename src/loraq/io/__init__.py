"""Files the ecosystem reads: PEFT adapter folders, bitsandbytes 4-bit checkpoints, merged exports.

Weights are only ever read through safetensors, and every write is atomic
(see :mod:`loraq.io.safe`).
"""

from .checkpoints import export_merged
from .inspect import format_inspection, inspect_path
from .peft_format import load_adapter, read_adapter, save_adapter
from .quantized import load_quantized, save_quantized
from .safe import FormatError

__all__ = [
    "FormatError",
    "export_merged",
    "format_inspection",
    "inspect_path",
    "load_adapter",
    "load_quantized",
    "read_adapter",
    "save_adapter",
    "save_quantized",
]
