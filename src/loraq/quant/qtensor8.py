"""The 8-bit record :class:`QuantizedTensor8` (loraq's ``int8`` format) and its state-dict layout.

Blockwise codes of the dynamic map, one code per byte. bitsandbytes has no module for this format
(its ``Linear8bitLt`` is LLM.int8, row-wise int8 with an ``SCB`` scale), so the layout is loraq's
own, shaped like the 4-bit one (``docs/formats.md``, "8-bit weights in a state dict")::

    <prefix>weight                                   uint8, the original shape
    <prefix>weight.absmax                            float32 (n_blocks,)
    <prefix>weight.quant_map                         float32 (256,)
    <prefix>weight.quant_state.loraq__dynamic        uint8 JSON: quant_type, blocksize, dtype, shape
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.dtypes import dtype_name
from ..native.pages import empty_for_write
from .blockwise import dequantize_8bit_blocks, quantize_8bit_blocks, resolve_dtype
from .codebooks import DEFAULT_BLOCKSIZE_8BIT, dynamic_map
from .state_json import (
    json_tensor,
    meta_blocksize,
    meta_dtype,
    meta_field,
    meta_shape,
    read_json,
    require_keys,
    take_tensor,
)

__all__ = ["QuantizedTensor8", "dequantize_8bit", "quantize_8bit"]


@dataclass(eq=False)
class QuantizedTensor8:
    """A tensor stored in loraq's ``int8`` format: 8-bit blockwise codes of the dynamic map
    (one code per byte).

    Attributes:
        codes: uint8 in the original shape. absmax: float32 ``(n_blocks,)`` (flat blocks).
        code: the 256-entry float32 map. blocksize: elements per block. dtype: original dtype.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype

    #: The format's name in loraq (``LoraConfig(quant="int8")``).
    quant_type = "int8"
    #: The format's tag in the state dict (the ``loraq__<tag>`` key and its JSON ``quant_type``),
    #: kept from the first files loraq wrote.
    STATE_TAG = "dynamic"
    #: The ``<kind>`` of the ``weight.quant_state.<kind>`` key this record reads and writes.
    STATE_KINDS = ("loraq__" + STATE_TAG,)
    #: Names of the tensor-valued fields, in state-dict order.
    TENSOR_FIELDS = ("codes", "absmax", "code")

    @property
    def shape(self) -> torch.Size:
        """The original shape (that of ``codes``)."""
        return self.codes.shape

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return self.codes.numel()

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and block scales (the shared code book is not counted)."""
        return self.codes.numel() + self.absmax.numel() * 4

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor-valued fields by name."""
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS}

    @classmethod
    @torch.no_grad()
    def from_tensor(
        cls, t: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE_8BIT
    ) -> QuantizedTensor8:
        """Quantize ``t`` blockwise to 8 bits with the dynamic map (bitsandbytes'
        ``quantize_blockwise``).

        Codes are the exactly nearest map entry to ``x * (1 / absmax)`` (ties to the lower
        index), the rule of bitsandbytes' CUDA kernel; its CPU kernel differs in about 0.15% of
        entries. The code book and the float32 absmax equal bitsandbytes'. Same errors as
        :meth:`QuantizedTensor.from_tensor`.
        """
        codes, absmax = quantize_8bit_blocks(t, blocksize)
        return cls(
            codes=codes.view(t.shape),
            absmax=absmax,
            code=dynamic_map().to(t.device, copy=True),
            blocksize=blocksize,
            dtype=t.dtype,
        )

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor: ``code[byte] * absmax`` in float32, cast once to ``dtype`` (default: the
        original dtype)."""
        dtype = resolve_dtype(dtype, self.dtype)
        out = empty_for_write(self.numel, dtype, self.device)
        return self.dequantize_range(0, self.numel, out).view(self.shape)

    def dequantize_range(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize flat elements ``[start, stop)`` into the 1-D ``out``; see
        :func:`~loraq.quant.blockwise.dequantize_8bit_blocks`."""
        return dequantize_8bit_blocks(
            self.codes, self.code, self.absmax, self.blocksize, start, stop, out
        )

    def to(self, device: torch.device | str) -> QuantizedTensor8:
        """A copy with every tensor moved to ``device`` (dtypes never change)."""
        moved = {k: t.to(device) for k, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under ``<prefix>weight``, ``.absmax``, ``.quant_map`` and the JSON state key."""
        key = prefix + "weight"
        meta = {
            "quant_type": self.STATE_TAG,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        return {
            key: self.codes,
            key + ".absmax": self.absmax,
            key + ".quant_map": self.code,
            f"{key}.quant_state.{self.STATE_KINDS[0]}": json_tensor(meta),
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedTensor8:
        """Inverse of :meth:`to_state_dict`; raises ValueError naming a missing or malformed key."""
        key = prefix + "weight"
        state_key = f"{key}.quant_state.{cls.STATE_KINDS[0]}"
        require_keys(sd, [key, key + ".absmax", key + ".quant_map", state_key])
        meta = read_json(sd[state_key], state_key)
        if meta_field(meta, "quant_type", state_key) != cls.STATE_TAG:
            raise ValueError(
                f"{state_key}: quant_type must be {cls.STATE_TAG!r}, got {meta['quant_type']!r}"
            )
        shape = meta_shape(meta, state_key)
        blocksize = meta_blocksize(meta, "blocksize", state_key)
        n_blocks = -(-math.prod(shape) // blocksize)
        return cls(
            codes=take_tensor(sd, key, torch.uint8, tuple(shape)),
            absmax=take_tensor(sd, key + ".absmax", torch.float32, (n_blocks,)),
            code=take_tensor(sd, key + ".quant_map", torch.float32, (256,)),
            blocksize=blocksize,
            dtype=meta_dtype(meta, "dtype", state_key),
        )


def quantize_8bit(t: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE_8BIT) -> QuantizedTensor8:
    """:meth:`QuantizedTensor8.from_tensor` as a function."""
    return QuantizedTensor8.from_tensor(t, blocksize)


def dequantize_8bit(q: QuantizedTensor8, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:meth:`QuantizedTensor8.dequantize` as a function."""
    return q.dequantize(dtype)
