"""``QLoRALayer``: a LoRA adapter over a frozen base stored in 4-bit NF4 or 8-bit blockwise."""

from __future__ import annotations

import torch
from torch import nn

from .adapter_quant import enable_adapter_quant
from .lora import LoRALayer
from .quantized import Linear4bit, Linear8bit


class QLoRALayer(LoRALayer):
    """Quantize ``original_layer``'s weight and add a LoRA adapter on top (QLoRA).

    ``y = dequant(W_q) x + b + (alpha/rank) * B(A(dropout(x)))``; the quantized base never gets
    a gradient and no dense copy of it is kept between calls.

    Args:
        original_layer: an ``nn.Linear`` (its weight is quantized; the module itself is not kept).
        rank: adapter rank.
        bits: 4 (NF4, or FP4 with ``quant_type="fp4"``) or 8 (blockwise dynamic 8-bit).
        alpha: scale numerator (default: ``rank``).
        dropout: dropout on the adapter input.
        quantize_adapters: keep A and B on a symmetric k-bit grid (2..8) in the forward pass,
            trained with a straight-through estimator; ``None`` for float adapters.
        quant_type, blocksize, double_quant, compute_dtype: base quantization settings
            (blocksize defaults to 64 for 4 bits and 256 for 8 bits).
    """

    def __init__(
        self,
        original_layer: nn.Linear,
        rank: int,
        bits: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        quantize_adapters: int | None = None,
        *,
        quant_type: str = "nf4",
        blocksize: int | None = None,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        adapter_name: str = "default",
    ) -> None:
        if not isinstance(original_layer, nn.Linear):
            raise TypeError(f"QLoRALayer needs an nn.Linear, got {type(original_layer).__name__}")
        if bits == 4:
            base = Linear4bit.from_linear(
                original_layer,
                quant_type=quant_type,
                blocksize=blocksize or 64,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
            )
        elif bits == 8:
            base = Linear8bit.from_linear(
                original_layer, blocksize=blocksize or 256, compute_dtype=compute_dtype
            )
        else:
            raise ValueError(f"QLoRALayer bits={bits!r} is invalid: expected 4 or 8")
        super().__init__(base, rank, alpha, dropout, adapter_name=adapter_name)
        if quantize_adapters is not None:
            enable_adapter_quant(self, adapter_name, quantize_adapters)
