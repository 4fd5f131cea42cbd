"""k-bit adapter weights on disk: integer codes + one scale per output row.

Adapters trained with ``LoraConfig(adapter_bits=k)`` live on a symmetric k-bit grid per output
row: ``w = code * scale`` with ``code`` in ``[-(2^(k-1)-1), 2^(k-1)-1]`` and
``scale = max|row| / (2^(k-1)-1)``. Storing the codes and the scales instead of float32 weights
is exact. The on-disk key set, next to PEFT's (``<w>`` is ``<m>.lora_A.weight`` or
``<m>.lora_B.weight``, whose rows are dim 0 and whose dim 1 is ``d1``):

===================  =====  ====================================  ================================
key                  bits   dtype                                 shape
===================  =====  ====================================  ================================
``<w>.codes``        2..4   uint8, two codes per byte             ``(rows, ceil(d1/2), *rest)``
``<w>.codes``        5..8   int8, one code per byte               like the weight
``<w>.scale``        2..8   float32                               ``(rows,)``
===================  =====  ====================================  ================================

Packing (k <= 4) runs along dim 1, so each row stays in its own bytes, aligned with its scale,
and the other dims (a convolution's kernel) keep their size. Each code is stored as the
unsigned nibble ``code + 2^(k-1)``, in ``1 .. 2^k - 1``; of the pair ``(w[:, 2j], w[:, 2j+1])``
the first goes in the high nibble and the second in the low one, as bitsandbytes packs its
4-bit weights. An odd ``d1`` is padded with the nibble 0, which no code uses, so the weight's
shape needs no extra key: the low nibbles of the last packed column are all 0 (odd ``d1``) or
all non-zero (even ``d1``).

Scales stay float32: they are the very scales the forward pass computes (``max|row| / levels``
in float32), and only these make the loaded weights, the logits and a second save
bit-identical; a float16 scale would move each weight (almost no such scale is a float16).
For a 4-bit ``lora_B`` of rank 8 the scale costs as much as the 8 codes it serves, so a 4-bit
adapter of rank 8 takes about 0.19 of its float32 size, not 1/8 (the ``lora_A`` matrices alone
take 0.13).

(``lora_embedding_A`` / ``lora_embedding_B`` take ``.codes`` / ``.scale`` the same way; other
tensors, such as DoRA magnitudes and ``modules_to_save``, stay float.) ``adapter_config.json``
carries ``"loraq_adapter_bits": k``.
"""

from __future__ import annotations

import torch

from ..core.naming import is_factor_key
from ..layers.adapter_quant import dequantize_codes, grid_levels, quantize_codes
from .safe import FormatError

#: Codes of at most this many bits are stored two per byte.
PACKED_MAX_BITS = 4


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two ``bits``-bit codes per uint8 along dim 1 (``bits <= 4``); see the module docstring."""
    if not 2 <= bits <= PACKED_MAX_BITS:
        raise ValueError(f"only codes of 2..{PACKED_MAX_BITS} bits are packed, got {bits}")
    if codes.dtype != torch.int8 or codes.ndim < 2:
        raise ValueError(f"expected int8 codes of 2 or more dims, got {codes.dtype} {codes.shape}")
    qmax = grid_levels(bits)
    if codes.numel() and (int(codes.min()) < -qmax or int(codes.max()) > qmax):
        raise ValueError(f"codes outside the {bits}-bit grid ±{qmax}")
    nibbles = (codes.to(torch.int16) + (qmax + 1)).to(torch.uint8)
    if nibbles.shape[1] % 2:
        pad = torch.zeros_like(nibbles.narrow(1, 0, 1))  # nibble 0: no code, marks the padding
        nibbles = torch.cat((nibbles, pad), dim=1)
    rows, width, *rest = nibbles.shape
    pairs = nibbles.reshape(rows, width // 2, 2, *rest)
    return (pairs[:, :, 0] << 4) | pairs[:, :, 1]


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes, with dim 1 ``2 * packed.shape[1]`` or one
    less when the last low nibbles are the padding. Raises ``ValueError`` for a wrong dtype,
    nibbles outside the grid or inconsistent padding."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"must be uint8 (two {bits}-bit codes per byte), found {packed.dtype}")
    if packed.ndim < 2:
        raise ValueError(f"must have 2 or more dims, found shape {tuple(packed.shape)}")
    qmax = grid_levels(bits)
    rows, half, *rest = packed.shape
    nibbles = torch.stack((packed >> 4, packed & 0x0F), dim=2).reshape(rows, 2 * half, *rest)
    width = 2 * half
    if packed.numel():
        padding = nibbles.select(1, width - 1) == 0
        if bool(padding.all()):
            width -= 1
        elif bool(padding.any()):
            raise ValueError(
                "has padding (nibble 0) in only some of its last low nibbles: the file is corrupt"
            )
        nibbles = nibbles.narrow(1, 0, width)
        if int(nibbles.min()) < 1 or int(nibbles.max()) > 2 * qmax + 1:
            raise ValueError(f"holds codes outside the {bits}-bit grid ±{qmax}")
    return (nibbles.to(torch.int16) - (qmax + 1)).to(torch.int8)


def encode(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Replace each adapter matrix by its ``.codes`` (packed for ``bits <= 4``) and ``.scale``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_factor_key(key):
            codes, out[key + ".scale"] = quantize_codes(tensor, bits)
            out[key + ".codes"] = pack_codes(codes, bits) if bits <= PACKED_MAX_BITS else codes
        else:
            out[key] = tensor
    return out


def grid_values(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The same tensors with each adapter factor replaced by its float32 k-bit grid values
    (what PEFT reads when an adapter is saved with ``dequantize=True``)."""
    return {
        k: dequantize_codes(*quantize_codes(t, bits)) if is_factor_key(k) else t
        for k, t in tensors.items()
    }


def decode(tensors: dict[str, torch.Tensor], bits: int, source: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`; checks dtypes, shapes, the padding and the code range.

    The weights are ``codes * scale``. For scales that :func:`~loraq.layers.adapter_quant.quantize_codes` produced
    (``max|row| / levels`` in float32) the forward pass re-quantizes these to the very same codes
    and scales, so outputs and a second save are bit-identical (checked in the tests).
    """
    out: dict[str, torch.Tensor] = {}
    qmax = grid_levels(bits)
    for key, tensor in tensors.items():
        if key.endswith(".scale") and is_factor_key(key[: -len(".scale")]):
            continue
        if not (key.endswith(".codes") and is_factor_key(key[: -len(".codes")])):
            if is_factor_key(key):
                raise FormatError(f"{source}: {key!r} should be stored as .codes + .scale")
            out[key] = tensor
            continue
        base = key[: -len(".codes")]
        scale = tensors.get(base + ".scale")
        if scale is None:
            raise FormatError(f"{source}: {key!r} has no matching {base + '.scale'!r}")
        if bits <= PACKED_MAX_BITS:
            try:
                codes = unpack_codes(tensor, bits)
            except ValueError as err:
                raise FormatError(f"{source}: {key!r} {err}") from None
        else:
            if tensor.dtype != torch.int8:
                raise FormatError(f"{source}: {key!r} must be int8, found {tensor.dtype}")
            # min/max, not abs: int8 abs(-128) is -128.
            if tensor.numel() and (int(tensor.min()) < -qmax or int(tensor.max()) > qmax):
                raise FormatError(
                    f"{source}: {key!r} holds codes outside the {bits}-bit grid ±{qmax}"
                )
            codes = tensor
        rows = codes.shape[0] if codes.ndim else 0
        if scale.dtype != torch.float32:
            raise FormatError(f"{source}: {base + '.scale'!r} must be float32, found {scale.dtype}")
        if tuple(scale.shape) != (rows,):
            raise FormatError(
                f"{source}: {base + '.scale'!r} has shape {tuple(scale.shape)} but the "
                f"codes need ({rows},)"
            )
        out[base] = dequantize_codes(codes, scale)
    return out
