"""k-bit adapter weights on disk: integer codes + one scale per output row.

Adapters trained with ``LoraConfig(adapter_bits=k)`` live on a symmetric k-bit grid per output
row: ``w = code * scale`` with ``code`` in ``[-(2^(k-1)-1), 2^(k-1)-1]`` and
``scale = max|row| / (2^(k-1)-1)``. Storing the codes (int8) and scales (float32) instead of
float32 weights is exact and about 4x smaller. The on-disk key set, next to PEFT's:

================================  =========  =============
key                               dtype      shape
================================  =========  =============
``<m>.lora_A.weight.codes``       int8       like the weight
``<m>.lora_A.weight.scale``       float32    (rows,)
``<m>.lora_B.weight.codes``       int8       like the weight
``<m>.lora_B.weight.scale``       float32    (rows,)
================================  =========  =============

(``lora_embedding_A`` / ``lora_embedding_B`` take ``.codes`` / ``.scale`` the same way; other
tensors, such as DoRA magnitudes and ``modules_to_save``, stay float.) ``adapter_config.json``
carries ``"loraq_adapter_bits": k``.
"""

from __future__ import annotations

import re

import torch

from ..layers.adapter_quant import dequantize_codes, quantize_codes
from .safe import FormatError

_QUANTIZED = re.compile(r".*\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def is_quantized_key(key: str) -> bool:
    """True for the adapter matrices that ``adapter_bits`` keeps on a k-bit grid."""
    return _QUANTIZED.fullmatch(key) is not None


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def to_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8, scale float32 per row)``: the grid the forward pass uses (adapter_quant)."""
    return quantize_codes(weight, bits)


def from_codes(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 grid values ``codes * scale`` (what PEFT gets with ``dequantize=True``)."""
    return dequantize_codes(codes, scale, torch.float32)


def encode(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Replace each adapter matrix by its ``.codes`` and ``.scale`` entries."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_quantized_key(key):
            out[key + ".codes"], out[key + ".scale"] = to_codes(tensor, bits)
        else:
            out[key] = tensor
    return out


def fake_quantize(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The same tensors with each adapter matrix rounded to its k-bit grid (float32)."""
    return {
        k: from_codes(*to_codes(t, bits)) if is_quantized_key(k) else t for k, t in tensors.items()
    }


def decode(tensors: dict[str, torch.Tensor], bits: int, source: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`; checks dtypes, shapes and the code range.

    The weights are ``codes * scale``. For scales that :func:`to_codes` produced
    (``max|row| / levels`` in float32) the forward pass re-quantizes these to the very same codes
    and scales, so outputs and a second save are bit-identical (checked in the tests).
    """
    out: dict[str, torch.Tensor] = {}
    qmax = _qmax(bits)
    for key, tensor in tensors.items():
        if key.endswith(".scale") and is_quantized_key(key[: -len(".scale")]):
            continue
        if not (key.endswith(".codes") and is_quantized_key(key[: -len(".codes")])):
            if is_quantized_key(key):
                raise FormatError(f"{source}: {key!r} should be stored as .codes + .scale")
            out[key] = tensor
            continue
        base = key[: -len(".codes")]
        scale = tensors.get(base + ".scale")
        if scale is None:
            raise FormatError(f"{source}: {key!r} has no matching {base + '.scale'!r}")
        if tensor.dtype != torch.int8:
            raise FormatError(f"{source}: {key!r} must be int8, found {tensor.dtype}")
        rows = tensor.shape[0] if tensor.ndim else 0
        if tuple(scale.shape) != (rows,):
            raise FormatError(
                f"{source}: {base + '.scale'!r} has shape {tuple(scale.shape)} but the "
                f"codes need ({rows},)"
            )
        if tensor.numel() and int(tensor.abs().max()) > qmax:
            raise FormatError(f"{source}: {key!r} holds codes outside the {bits}-bit grid ±{qmax}")
        out[base] = from_codes(tensor, scale)
    return out
