"""``QLoRALayer``: a LoRA adapter over a frozen base quantized in one of loraq's base formats.

The formats, their bits and default block sizes are :mod:`loraq.quant.formats`' table; the base
is built by :func:`loraq.layers.bases.quantize_linear`, the same path ``LoraConfig(quant=...)``
takes, so both give the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.formats import BLOCKWISE, base_format, format_names
from .adapter_quant import enable_adapter_quant
from .bases import quantize_linear
from .lora import LoRALayer


def _resolve_quant(quant: str | None, bits: int | None, quant_type: str) -> str:
    """The base format from the canonical ``quant`` or the seed's ``bits`` + ``quant_type``."""
    if quant is not None:
        writable = format_names(quantize=True)
        if quant not in writable:
            raise ValueError(
                f"QLoRALayer quant={quant!r} is invalid: expected one of {', '.join(writable)}"
            )
        if bits is not None and bits != base_format(quant).code_bits:
            raise ValueError(f"QLoRALayer got quant={quant!r} and bits={bits!r}, which disagree")
        return quant
    bits = 4 if bits is None else bits
    # The seed's bits select among the blockwise formats of that code width.
    same_width = format_names(kind=BLOCKWISE, quantize=True, code_bits=bits)
    if not same_width:
        widths = sorted({base_format(n).code_bits for n in format_names(kind=BLOCKWISE)})
        raise ValueError(f"QLoRALayer bits={bits!r} is invalid: expected one of {widths}")
    if len(same_width) == 1:
        return same_width[0]
    if quant_type not in same_width:
        raise ValueError(
            f"QLoRALayer quant_type={quant_type!r} is invalid for bits={bits}: expected one of "
            f"{', '.join(same_width)}"
        )
    return quant_type


class QLoRALayer(LoRALayer):
    """Quantize ``original_layer``'s weight and add a LoRA adapter on top (QLoRA).

    ``y = dequant(W_q) x + b + (alpha/rank) * B(A(dropout(x)))``; the quantized base never gets
    a gradient and no dense copy of it is kept between calls.

    The canonical keywords are those of :class:`loraq.LoraConfig`: ``quant`` (any format it
    accepts) and ``adapter_bits``. The seed's ``bits`` (4 or 8, with ``quant_type`` for 4 bits)
    and ``quantize_adapters`` are accepted as aliases.

    Args:
        original_layer: an ``nn.Linear`` (its weight is quantized; the module itself is not kept).
        rank: adapter rank.
        bits: alias: the code width of a blockwise format, 4 (``quant=quant_type``) or 8
            (``int8``); default 4.
        alpha: scale numerator (default: ``rank``).
        dropout: dropout on the adapter input.
        quantize_adapters: alias of ``adapter_bits``.
        quant: base format, one :mod:`loraq.quant.formats` writes (default: from ``bits``).
        adapter_bits: keep A and B on a symmetric k-bit grid (2..8) in the forward pass,
            trained with a straight-through estimator; ``None`` for float adapters.
        quant_type, blocksize, double_quant, compute_dtype: base quantization settings
            (``blocksize`` ``None``: the format's default from the table).
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
        base = quantize_linear(
            original_layer,
            quant,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        super().__init__(base, rank, alpha, dropout, adapter_name=adapter_name)
        if adapter_bits is not None:
            enable_adapter_quant(self, adapter_name, adapter_bits)
