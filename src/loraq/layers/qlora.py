"""``QLoRALayer``: a LoRA adapter over a frozen base stored in 4-bit NF4/FP4 or 8-bit blockwise."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.codebooks import DEFAULT_BLOCKSIZE_4BIT, DEFAULT_BLOCKSIZE_8BIT
from .adapter_quant import enable_adapter_quant
from .lora import LoRALayer
from .quantized import Linear4bit, Linear8bit

#: Base formats, as ``LoraConfig.quant`` names them.
QUANT_FORMATS = ("nf4", "fp4", "int8")


def _resolve_quant(quant: str | None, bits: int | None, quant_type: str) -> str:
    """The base format from the canonical ``quant`` or the seed's ``bits`` + ``quant_type``."""
    if quant is not None:
        if quant not in QUANT_FORMATS:
            raise ValueError(
                f"QLoRALayer quant={quant!r} is invalid: expected one of {QUANT_FORMATS}"
            )
        if bits is not None and bits != (8 if quant == "int8" else 4):
            raise ValueError(f"QLoRALayer got quant={quant!r} and bits={bits!r}, which disagree")
        return quant
    bits = 4 if bits is None else bits
    if bits == 4:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(
                f"QLoRALayer quant_type={quant_type!r} is invalid: expected 'nf4' or 'fp4'"
            )
        return quant_type
    if bits == 8:
        return "int8"
    raise ValueError(f"QLoRALayer bits={bits!r} is invalid: expected 4 or 8")


class QLoRALayer(LoRALayer):
    """Quantize ``original_layer``'s weight and add a LoRA adapter on top (QLoRA).

    ``y = dequant(W_q) x + b + (alpha/rank) * B(A(dropout(x)))``; the quantized base never gets
    a gradient and no dense copy of it is kept between calls.

    The canonical keywords are those of :class:`loraq.LoraConfig`: ``quant`` (``"nf4"``,
    ``"fp4"`` or ``"int8"``) and ``adapter_bits``. The seed's ``bits`` (4 or 8, with
    ``quant_type`` for 4 bits) and ``quantize_adapters`` are accepted as aliases.

    Args:
        original_layer: an ``nn.Linear`` (its weight is quantized; the module itself is not kept).
        rank: adapter rank.
        bits: alias: 4 (``quant=quant_type``) or 8 (``quant="int8"``); default 4.
        alpha: scale numerator (default: ``rank``).
        dropout: dropout on the adapter input.
        quantize_adapters: alias of ``adapter_bits``.
        quant: base format, ``"nf4"``, ``"fp4"`` or ``"int8"`` (default: from ``bits``).
        adapter_bits: keep A and B on a symmetric k-bit grid (2..8) in the forward pass,
            trained with a straight-through estimator; ``None`` for float adapters.
        quant_type, blocksize, double_quant, compute_dtype: base quantization settings
            (blocksize defaults to 64 for 4 bits and 256 for 8 bits).
    """

    def __init__(
        self,
        original_layer: nn.Linear,
        rank: int,
        bits: int | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        quantize_adapters: int | None = None,
        *,
        quant: str | None = None,
        adapter_bits: int | None = None,
        quant_type: str = "nf4",
        blocksize: int | None = None,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
    ) -> None:
        if not isinstance(original_layer, nn.Linear):
            raise TypeError(f"QLoRALayer needs an nn.Linear, got {type(original_layer).__name__}")
        if (
            adapter_bits is not None
            and quantize_adapters is not None
            and adapter_bits != quantize_adapters
        ):
            raise ValueError(
                f"QLoRALayer got adapter_bits={adapter_bits!r} and quantize_adapters="
                f"{quantize_adapters!r}, which disagree"
            )
        adapter_bits = adapter_bits if adapter_bits is not None else quantize_adapters
        quant = _resolve_quant(quant, bits, quant_type)
        if quant == "int8":
            base = Linear8bit.from_linear(
                original_layer,
                blocksize=blocksize or DEFAULT_BLOCKSIZE_8BIT,
                compute_dtype=compute_dtype,
            )
        else:
            base = Linear4bit.from_linear(
                original_layer,
                quant_type=quant,
                blocksize=blocksize or DEFAULT_BLOCKSIZE_4BIT,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
            )
        super().__init__(base, rank, alpha, dropout, adapter_name=adapter_name)
        if adapter_bits is not None:
            enable_adapter_quant(self, adapter_name, adapter_bits)
