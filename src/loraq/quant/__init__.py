"""Blockwise quantization compatible with bitsandbytes: NF4/FP4 4-bit, 8-bit dynamic map.

Pure functions (:mod:`.blockwise`), code books (:mod:`.codebooks`) and the records that hold a
quantized tensor and read/write bitsandbytes' state-dict layout (:mod:`.qtensor`).
"""

from .blockwise import (
    VALID_BLOCKSIZES,
    dequantize_4bit,
    dequantize_8bit,
    pack_nibbles,
    quantize_4bit,
    quantize_8bit,
    unpack_nibbles,
)
from .codebooks import FP4, NF4, code_4bit, dynamic_map
from .qtensor import NESTED_BLOCKSIZE, QuantizedTensor, QuantizedTensor8

__all__ = [
    "FP4",
    "NESTED_BLOCKSIZE",
    "NF4",
    "VALID_BLOCKSIZES",
    "QuantizedTensor",
    "QuantizedTensor8",
    "code_4bit",
    "dequantize_4bit",
    "dequantize_8bit",
    "dynamic_map",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_8bit",
    "unpack_nibbles",
]
