"""Frozen bases stored in GGUF blocks: :class:`LinearGGUF` and :class:`EmbeddingGGUF`.

They are the GGUF counterparts of ``Linear4bit`` / ``Embedding4bit`` and share their machinery
(the same autograd function, :class:`~loraq.layers.scratch.DequantScratch`, state-dict
handling and the :class:`~loraq.layers.protocol.QuantizedBase` members), so LoRA, merging,
saving and the fused step treat a ``q4_0`` base exactly as an NF4 one. The weight is a
:class:`~loraq.quant.gguf_tensor.GGUFTensor`: the bytes a ``.gguf`` file holds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.precision import autocast_dtype
from ..native.dequant import gguf_matmul
from ..quant.gguf_tensor import GGUFTensor
from .protocol import LAYOUT_LINEAR
from .quantized import RECORD_PREFIX, Embedding4bit, _linear_weight, _QuantizedLinear

__all__ = ["PACKED_MAX_ROWS", "EmbeddingGGUF", "LinearGGUF"]

#: Most input rows for which a forward reads the blocks packed (decode steps of up to this many
#: rows, short prompts); above it the whole weight is dequantized once and BLAS amortises it
#: over the rows. Where the two cross depends on the CPU; on the Zen 4 measured (AVX-512) the
#: packed kernel (8 rows per decoded block) was still ahead at 64 rows.
PACKED_MAX_ROWS = 64


class LinearGGUF(_QuantizedLinear):
    """A frozen ``nn.Linear`` whose weight is held in GGUF blocks (as llama.cpp stores it).

    The forward equals ``F.linear(x, W, b)`` with ``W = dequantize_weight()`` in
    ``compute_dtype``. Build it with :meth:`from_linear` or from a GGUF file's bytes.
    """

    _record_type = GGUFTensor

    def __init__(
        self,
        qweight: GGUFTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        dense_layout: str = LAYOUT_LINEAR,
    ) -> None:
        if not isinstance(qweight, GGUFTensor):
            raise TypeError(f"qweight must be a GGUFTensor, got {type(qweight).__name__}")
        super().__init__(qweight, bias, compute_dtype, dense_layout)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, quant_type: str = "q4_0", compute_dtype: torch.dtype = torch.float32
    ) -> LinearGGUF:
        """Quantize the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` into ``quant_type``
        blocks (``in_features`` a multiple of 32); copies the bias and records the layout."""
        weight, layout = _linear_weight(linear)
        return cls(GGUFTensor.from_tensor(weight, quant_type), linear.bias, compute_dtype, layout)

    def reads_packed(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` on ``x`` reads the blocks packed inside the dot products
        (:func:`~loraq.native.dequant.gguf_matmul`): a float32 layer and input on CPU, at most
        :data:`PACKED_MAX_ROWS` rows, no gradient to record, no autocast. Otherwise the whole
        weight is dequantized and ``F.linear`` runs: the reference the packed path equals up
        to float32 rounding of the sums."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.compute_dtype == torch.float32
            and x.numel() <= PACKED_MAX_ROWS * self.in_features
            and not (torch.is_grad_enabled() and x.requires_grad)
            and autocast_dtype("cpu") is None
        )

    def packed_blocks(self) -> tuple[torch.Tensor, str] | None:
        """``(blocks, quant_type)`` for compiled code that reads the weight packed as
        :meth:`forward` does (uint8 blocks ``(out_features, row_bytes)``), or None where
        :meth:`forward` never would: a compute dtype other than float32."""
        if self.compute_dtype != torch.float32:
            return None
        return getattr(self, RECORD_PREFIX + "blocks"), self._record_meta["quant_type"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` (see :class:`LinearGGUF`); a few rows read the blocks packed."""
        if self.reads_packed(x) and x.shape[-1] == self.in_features:
            flat = x.reshape(-1, self.in_features).contiguous()
            # the blocks buffer itself: building the qweight record validates it on every call
            blocks, quant_type = self.packed_blocks()
            out = gguf_matmul(flat, blocks, quant_type)
            if out is not None:
                if self.bias is not None:
                    out += self.bias.to(out.dtype)
                return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)

    def _quantize(self, weight: torch.Tensor) -> GGUFTensor:
        return GGUFTensor.from_tensor(weight, self.qweight.quant_type)

    def _format_repr(self) -> str:
        return f"quant_type={self.qweight.quant_type}"


class EmbeddingGGUF(Embedding4bit):
    """A frozen ``nn.Embedding`` held in GGUF blocks; a lookup dequantizes only its rows.

    Everything but the storage is ``Embedding4bit``'s (index checks, dtype following,
    ``dequantize_weight``), so ``dequantize_model`` and ``unload`` restore an ``nn.Embedding``.
    """

    _record_type = GGUFTensor

    @classmethod
    def from_embedding(  # type: ignore[override]
        cls,
        embedding: nn.Embedding,
        quant_type: str = "q8_0",
        compute_dtype: torch.dtype | None = None,
    ) -> EmbeddingGGUF:
        """Quantize ``embedding.weight`` into ``quant_type`` blocks (``embedding_dim`` a
        multiple of 32); output dtype ``compute_dtype`` (default: the weight's)."""
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("EmbeddingGGUF supports neither max_norm nor sparse embeddings")
        qweight = GGUFTensor.from_tensor(embedding.weight, quant_type)
        return cls(qweight, embedding.padding_idx, compute_dtype)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.dequantize_rows(ids.to(torch.int64), self.compute_dtype)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, "
            f"quant_type={self.qweight.quant_type}, compute_dtype={self.compute_dtype}"
        )
