"""Blockwise quantization compatible with bitsandbytes: NF4/FP4 4-bit, 8-bit dynamic map.

Code books and format constants (:mod:`.codebooks`), pure math on tensors (:mod:`.blockwise`) and
the records that hold a quantized tensor, quantize with ``from_tensor`` and read/write their
state-dict layout (:mod:`.qtensor` 4-bit, :mod:`.qtensor8` 8-bit, :mod:`.state_json` shared
readers). GGUF (llama.cpp) block formats q8_0/q4_0/q4_1 (+ k-quant dequantize) are pure math in
:mod:`.gguf` and a record in :mod:`.gguf_tensor`. Imports run codebooks <- blockwise <- qtensor /
qtensor8, and gguf <- gguf_tensor.
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
from .gguf import GGUF_QUANT_TYPES, GGUF_TRAINABLE_TYPES, dequantize_gguf, quantize_gguf
from .gguf_tensor import GGUFTensor
from .qtensor import QuantizedTensor, dequantize_4bit, quantize_4bit
from .qtensor8 import QuantizedTensor8, dequantize_8bit, quantize_8bit

__all__ = [
    "DEFAULT_BLOCKSIZE_4BIT",
    "DEFAULT_BLOCKSIZE_8BIT",
    "FP4",
    "GGUF_QUANT_TYPES",
    "GGUF_TRAINABLE_TYPES",
    "GGUFTensor",
    "NESTED_BLOCKSIZE",
    "NF4",
    "VALID_BLOCKSIZES",
    "QuantizedTensor",
    "QuantizedTensor8",
    "code_4bit",
    "dequantize_4bit",
    "dequantize_8bit",
    "dequantize_gguf",
    "dynamic_map",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_8bit",
    "quantize_gguf",
    "unpack_nibbles",
]
