"""The base formats: bitsandbytes-compatible blockwise (NF4/FP4 4-bit, int8 on the dynamic map)
and GGUF (llama.cpp) blocks.

:mod:`.formats` is the one table of the formats (name, kind, bits, default block size, record,
what loraq may do with each); every other package reads it. Below it, the math: code books and
blockwise constants (:mod:`.codebooks`), pure math on tensors (:mod:`.blockwise`), the records
that hold a quantized tensor, quantize with ``from_tensor`` and read/write their state-dict layout
(:mod:`.qtensor` 4-bit, :mod:`.qtensor8` 8-bit, :mod:`.state_json` shared readers), and GGUF block
math (:mod:`.gguf`; the k-quants' search in :mod:`.kquants`) with its record (:mod:`.gguf_tensor`).
Imports run codebooks <- blockwise <- qtensor / qtensor8, kquants <- gguf <- gguf_tensor, and all
of them <- formats.
Only layers/ and above import this package; the layer of each format is in
:mod:`loraq.layers.bases`.
"""

from .blockwise import pack_nibbles, unpack_nibbles
from .codebooks import (
    DEFAULT_BLOCKSIZE_4BIT,
    DEFAULT_BLOCKSIZE_8BIT,
    FP4,
    NESTED_BLOCKSIZE,
    NF4,
    VALID_BLOCKSIZES,
    code_4bit,
    dynamic_map,
)
from .formats import FORMATS, BaseFormat, base_format, format_names
from .gguf import GGUF_QUANT_TYPES, GGUF_TRAINABLE_TYPES, dequantize_gguf, quantize_gguf
from .gguf_tensor import GGUFTensor
from .qtensor import QuantizedTensor, dequantize_4bit, quantize_4bit
from .qtensor8 import QuantizedTensor8, dequantize_8bit, quantize_8bit

__all__ = [
    "DEFAULT_BLOCKSIZE_4BIT",
    "DEFAULT_BLOCKSIZE_8BIT",
    "FORMATS",
    "FP4",
    "GGUF_QUANT_TYPES",
    "GGUF_TRAINABLE_TYPES",
    "GGUFTensor",
    "NESTED_BLOCKSIZE",
    "NF4",
    "VALID_BLOCKSIZES",
    "BaseFormat",
    "QuantizedTensor",
    "QuantizedTensor8",
    "base_format",
    "code_4bit",
    "dequantize_4bit",
    "dequantize_8bit",
    "dequantize_gguf",
    "dynamic_map",
    "format_names",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_8bit",
    "quantize_gguf",
    "unpack_nibbles",
]
