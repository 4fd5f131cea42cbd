""":class:`GGUFTensor`: a tensor held as GGUF (llama.cpp) blocks, and its state-dict layout.

The blocks are the file's own bytes: uint8 ``(rows, row_bytes)`` for a ``(rows, cols)`` tensor,
one row after another, exactly as a ``.gguf`` file stores them (see :mod:`loraq.quant.gguf`).
In a state dict (``save_quantized``) a record is written as (``docs/formats.md``)::

    <prefix>weight                           uint8 (rows, row_bytes)  the blocks
    <prefix>weight.quant_state.loraq__gguf   uint8 JSON: quant_type, dtype, shape
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.dtypes import dtype_name
from .gguf import (
    block_size,
    dequantize_gguf,
    dequantize_gguf_into,
    gguf_bytes_shape,
    quantize_gguf,
)
from .state_json import json_tensor, meta_dtype, meta_field, meta_shape, read_json, require_keys

__all__ = ["GGUF_STATE_KIND", "GGUFTensor"]

#: The ``<kind>`` of the ``weight.quant_state.<kind>`` key of a GGUF record.
GGUF_STATE_KIND = "loraq__gguf"


@dataclass(eq=False)
class GGUFTensor:
    """A 2-D tensor stored in GGUF blocks of one of the formats :mod:`.gguf` dequantizes.

    Attributes:
        blocks: uint8 ``(rows, cols // block_size * type_size)``, the file's bytes.
        shape: the logical ``(rows, cols)``. dtype: the default dequantization dtype.
        quant_type: the block format's name.

    Build one with :meth:`from_tensor` or from a file's bytes.
    """

    blocks: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str

    #: Names of the tensor-valued fields.
    TENSOR_FIELDS = ("blocks",)
    #: The ``<kind>`` of the ``weight.quant_state.<kind>`` key this record reads and writes.
    STATE_KINDS = (GGUF_STATE_KIND,)

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        block_size(self.quant_type)  # refuses an unknown block format, naming the known ones
        if len(self.shape) != 2:
            raise ValueError(f"a GGUF record must be 2-D, got shape {tuple(self.shape)}")
        expected = gguf_bytes_shape(self.shape, self.quant_type)
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != expected:
            raise ValueError(
                f"{self.quant_type} blocks for shape {tuple(self.shape)} must be uint8 {expected}, "
                f"got {self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    @classmethod
    def from_tensor(
        cls, weight: torch.Tensor, quant_type: str, dtype: torch.dtype | None = None
    ) -> GGUFTensor:
        """Quantize a dense 2-D ``weight`` (see :func:`~loraq.quant.gguf.quantize_gguf`);
        ``dtype`` (default: the weight's) is what :meth:`dequantize` returns by default."""
        blocks = quantize_gguf(weight, quant_type)
        return cls(blocks, weight.shape, dtype or weight.dtype, quant_type)

    @property
    def numel(self) -> int:
        """Number of elements of the logical tensor."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        """Device of the blocks."""
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (scales included: a GGUF block carries its own)."""
        return self.blocks.numel()

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor-valued fields by name."""
        return {"blocks": self.blocks}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: :attr:`dtype`)."""
        return dequantize_gguf(self.blocks, self.quant_type, self.shape, dtype or self.dtype)

    def dequantize_range(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize flat elements ``[start, stop)`` into the flat tensor ``out``."""
        bs = block_size(self.quant_type)
        first, last = start // bs, -(-stop // bs)
        if start % bs == 0 and stop % bs == 0:
            return dequantize_gguf_into(self.blocks, self.quant_type, out[: stop - start], first)
        tmp = torch.empty((last - first) * bs, dtype=torch.float32, device=self.device)
        dequantize_gguf_into(self.blocks, self.quant_type, tmp, first)
        offset = start - first * bs
        return out[: stop - start].copy_(tmp[offset : offset + stop - start])

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``rows`` (int64, any shape) of the dense tensor: ``(*rows.shape, cols)``."""
        picked = self.blocks[rows.reshape(-1)]
        cols = self.shape[1]
        out = dequantize_gguf(picked, self.quant_type, (picked.shape[0], cols), dtype or self.dtype)
        return out.view(*rows.shape, cols)

    def to(self, device: torch.device | str) -> GGUFTensor:
        """A copy with the blocks on ``device`` (bytes unchanged)."""
        return dataclasses.replace(self, blocks=self.blocks.to(device))

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``<prefix>weight`` (the blocks) and ``<prefix>weight.quant_state.loraq__gguf`` (JSON)."""
        meta = {
            "quant_type": self.quant_type,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        key = prefix + "weight"
        return {key: self.blocks, f"{key}.quant_state.{GGUF_STATE_KIND}": json_tensor(meta)}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> GGUFTensor:
        """Inverse of :meth:`to_state_dict`; raises ValueError naming the missing or bad key."""
        key = prefix + "weight"
        state_key = f"{key}.quant_state.{GGUF_STATE_KIND}"
        require_keys(sd, [key, state_key])
        meta = read_json(sd[state_key], state_key)
        quant_type = meta_field(meta, "quant_type", state_key)
        shape = meta_shape(meta, state_key)
        dtype = meta_dtype(meta, "dtype", state_key)
        try:
            return cls(sd[key], shape, dtype, quant_type)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{key}: {err}") from None
