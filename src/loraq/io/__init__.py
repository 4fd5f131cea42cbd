"""Files the ecosystem reads: PEFT adapter folders (:mod:`.peft_format`; :mod:`.peft_factors`
groups a file's factors by module for the serving pool), bitsandbytes 4-bit checkpoints, merged exports,
GGUF models and adapters for llama.cpp (:mod:`.gguf_read`, :mod:`.gguf_write`,
:mod:`.gguf_adapter`; :mod:`.gguf_names` is THE table of architectures, :mod:`.gguf_tokenizer`
writes a transformers tokenizer as GGUF metadata, :mod:`.gguf_inspect` describes a file;
:mod:`.gguf_header` checks a file's structure against its size and :mod:`.gguf_hparams` its
hyperparameters before anything is built from them).

Weights are only ever read through safetensors or the format's own reader (the ``gguf``
package for GGUF), and every write is atomic
(see :mod:`loraq.io.safe`).
"""

from .gguf_adapter import load_gguf_adapter
from .gguf_read import load_gguf
from .gguf_write import export_gguf
from .inspect import format_inspection, inspect_path
from .merged_export import export_merged
from .peft_format import load_adapter, read_adapter, save_adapter
from .quantized import load_quantized, save_quantized
from .safe import FormatError

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
    "read_adapter",
    "save_adapter",
    "save_quantized",
]
