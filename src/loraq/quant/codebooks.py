"""Code books for blockwise quantization, bit-identical to bitsandbytes.

Three tables live here (see ``docs/formats.md``, "Code books"):

* :data:`NF4` - the 16 NormalFloat4 values of QLoRA, hard-coded as float32 bit patterns.
* :data:`FP4` - bitsandbytes' 4-bit float (E2M1, bias 2), in nibble order (not sorted).
* :func:`dynamic_map` - the 256-entry signed dynamic tree map used for 8-bit blockwise
  quantization and for the second level of double quantization.

It also holds the blockwise constants the math needs: the accepted blocksizes, the default
blocksize of each code width, and the blocksize of the second level of double quantization.
Which formats exist, and what each may be used for, is :mod:`loraq.quant.formats`' table; the
4-bit code books are keyed by those formats' names because a name selects its code book.

The tensors here are shared constants, read-only by convention: quantizers hand each record its
own copy. Decision bounds for nearest-code search live with the quantizer (``blockwise.py``).
"""

from __future__ import annotations

import functools
import struct

import torch

__all__ = [
    "CODE_BOOKS_4BIT",
    "DEFAULT_BLOCKSIZE_4BIT",
    "DEFAULT_BLOCKSIZE_8BIT",
    "NESTED_BLOCKSIZE",
    "NF4",
    "FP4",
    "VALID_BLOCKSIZES",
    "code_4bit",
    "dynamic_map",
]

#: Blocksizes accepted for 4-bit and 8-bit blockwise quantization (as bitsandbytes).
VALID_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Default blocksize of 4-bit (NF4/FP4) weights: QLoRA's and bitsandbytes' choice.
DEFAULT_BLOCKSIZE_4BIT = 64
#: Default blocksize of 8-bit blockwise weights (the ``int8`` format). bitsandbytes'
#: ``quantize_blockwise`` signature defaults to 4096, but every 8-bit blockwise tensor bitsandbytes
#: itself keeps (8-bit optimizer states, the nested scales of double quantization) uses 256; so
#: does loraq (the measured trade-off is in :mod:`loraq.quant.formats`).
DEFAULT_BLOCKSIZE_8BIT = 256
#: Blocksize of the second (8-bit) level of double quantization.
NESTED_BLOCKSIZE = 256


def _from_bits(bits: list[int]) -> torch.Tensor:
    """Build a float32 tensor from IEEE-754 bit patterns (exact, no decimal rounding)."""
    return torch.tensor([struct.unpack("<f", struct.pack("<I", b))[0] for b in bits])


# NF4, index 0..15 (docs/formats.md). Stored as bit patterns so no decimal round trip can
# change a value; the table is sorted ascending and index 7 is exact zero.
NF4: torch.Tensor = _from_bits(
    [
        0xBF800000,  # -1.0
        0xBF3239B1,  # -0.6961928009986877
        0xBF066B30,  # -0.5250730514526367
        0xBECA32A0,  # -0.39491748809814453
        0xBE91A24D,  # -0.28444138169288635
        0xBE3D353F,  # -0.18477343022823334
        0xBDBA7871,  # -0.09105003625154495
        0x00000000,  # 0.0
        0x3DA2FAFF,  # 0.07958029955625534
        0x3E24CAE3,  # 0.16093020141124725
        0x3E7C04DD,  # 0.24611230194568634
        0x3EAD033A,  # 0.33791524171829224
        0x3EE1A4B8,  # 0.44070982933044434
        0x3F1007AB,  # 0.5626170039176941
        0x3F3913B3,  # 0.7229568362236023
        0x3F800000,  # 1.0
    ]
)

# FP4 (docs/formats.md): bit 3 is the sign, bits 0-2 index the magnitudes below (in units
# of 1/12, so the largest is 1.0). The division happens in float32, as in bitsandbytes.
# Index 8 is +0.0, not -0.0: bitsandbytes writes it as the integer literal ``-0``.
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4: torch.Tensor = (
    torch.tensor(_FP4_MAGNITUDES + [-m if m else 0.0 for m in _FP4_MAGNITUDES]) / 12.0
)

#: The 4-bit formats' code books by format name (the formats' other facts: loraq.quant.formats).
CODE_BOOKS_4BIT: dict[str, torch.Tensor] = {"nf4": NF4, "fp4": FP4}


def code_4bit(quant_type: str) -> torch.Tensor:
    """Return the 16-entry float32 code book of the 4-bit format ``quant_type`` (nf4, fp4).

    Raises:
        ValueError: for a name with no 4-bit code book.
    """
    if quant_type not in CODE_BOOKS_4BIT:
        raise ValueError(
            f"unknown quant_type {quant_type!r}: expected one of {tuple(CODE_BOOKS_4BIT)}"
        )
    return CODE_BOOKS_4BIT[quant_type]


@functools.cache
def dynamic_map() -> torch.Tensor:
    """Return the signed 8-bit dynamic tree map, equal to bitsandbytes' ``create_dynamic_map()``.

    The map (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning") spends a
    variable number of bits on a decimal exponent and the rest on a linear fraction: for
    exponent step ``i`` in 0..6 there are ``2**i`` magnitudes ``10**(i - 6) * m``, where the
    ``m`` are the midpoints of an even split of [0.1, 1] into ``2**i`` parts; each comes with
    its negative. With 0 and 1.0 that makes 2 * 127 + 2 = 256 values, sorted ascending.

    The arithmetic mirrors the reference so every value is bit-identical: the split and its
    midpoints are float32, the decimal scale is a Python float multiplied into the float32
    tensor, and the sorted values are rounded to float32 once more.

    Returns:
        A sorted float32 tensor of 256 entries spanning [-0.99297, 1.0], with exactly one 0.
    """
    values: list[float] = [0.0, 1.0]
    for step in range(7):
        boundaries = torch.linspace(0.1, 1, 2**step + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (step - 6)
        values.extend((scale * means).tolist())
        values.extend((-scale * means).tolist())
    values.sort()
    return torch.tensor(values, dtype=torch.float32)
