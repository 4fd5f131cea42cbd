"""The 4-bit record :class:`QuantizedTensor` and its state-dict layout.

:class:`QuantizedTensor` holds bitsandbytes' ``Params4bit`` data plus its ``QuantState``, as
plain fields. Its state dict uses exactly the keys and bytes that ``bnb.nn.Linear4bit`` and
transformers write (``docs/formats.md``, "4-bit weights in a state dict")::

    <prefix>weight                                   uint8 ((n + 1) // 2, 1)  packed nibbles
    <prefix>weight.absmax                            float32 (n_blocks,), or uint8 codes with DQ
    <prefix>weight.quant_map                         float32 (16,)
    <prefix>weight.nested_absmax                     float32 (ceil(n_blocks / 256),)   DQ only
    <prefix>weight.nested_quant_map                  float32 (256,)                    DQ only
    <prefix>weight.quant_state.bitsandbytes__<type>  uint8 JSON: quant_type, blocksize, dtype,
                                                     shape[, nested_blocksize, nested_dtype,
                                                     nested_offset]

The 8-bit record is :class:`loraq.quant.qtensor8.QuantizedTensor8`. A record quantizes with its
classmethod ``from_tensor`` (as torchao's ``NF4Tensor.from_tensor``) and dequantizes with
``dequantize``; the math lives in :mod:`loraq.quant.blockwise`, which this module imports (never
the other way round). :func:`quantize_4bit` / :func:`dequantize_4bit` are the same operations
spelled as functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.dtypes import dtype_name
from ..native import dequant as cpu_kernels
from ..native.pages import empty_for_write
from .blockwise import (
    dequantize_4bit_blocks,
    dequantize_8bit_blocks,
    quantize_4bit_blocks,
    quantize_8bit_blocks,
    resolve_dtype,
)
from .codebooks import (
    CODE_BOOKS_4BIT,
    DEFAULT_BLOCKSIZE_4BIT,
    NESTED_BLOCKSIZE,
    code_4bit,
    dynamic_map,
)
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

__all__ = ["QuantizedTensor", "dequantize_4bit", "quantize_4bit"]


@dataclass(eq=False)
class QuantizedTensor:
    """A tensor stored in 4-bit blocks (NF4 or FP4), optionally with double-quantized scales.

    Attributes:
        packed: uint8 ``((n + 1) // 2, 1)``; two codes per byte, even index in the high nibble.
        shape: the original shape. dtype: the original dtype (the default dequantization dtype).
        blocksize: elements per block (flat, row-major). quant_type: a 4-bit format's name.
        code: the 16-entry float32 code book.
        absmax: float32 ``(n_blocks,)`` block scales, or None under double quantization, where
            ``absmax_codes`` (uint8 ``(n_blocks,)``), ``nested_absmax`` (float32, one per
            ``nested_blocksize`` blocks), ``nested_code`` (the 256-entry dynamic map) and
            ``offset`` (float32 0-dim, the mean subtracted first) describe them instead.

    Build one with :meth:`from_tensor` (or :func:`loraq.quant.quantize_4bit`) or
    :meth:`from_state_dict`.
    """

    packed: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    #: Names of the tensor-valued fields, in state-dict order.
    TENSOR_FIELDS = (
        "packed",
        "absmax",
        "absmax_codes",
        "code",
        "nested_absmax",
        "nested_code",
        "offset",
    )
    #: The ``<kind>`` of the ``weight.quant_state.<kind>`` keys this record reads and writes.
    STATE_KINDS = tuple(f"bitsandbytes__{t}" for t in CODE_BOOKS_4BIT)

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        nested = [self.absmax_codes, self.nested_absmax, self.nested_code, self.offset]
        if self.absmax is not None and any(t is not None for t in nested):
            raise ValueError("give either absmax or the double-quantization fields, not both")
        if self.absmax is None and any(t is None for t in nested):
            raise ValueError(
                "without absmax, absmax_codes, nested_absmax, nested_code and offset are all required"
            )

    # ---------------------------------------------------------------- derived facts
    @property
    def double_quant(self) -> bool:
        """True when the block scales are themselves 8-bit quantized."""
        return self.absmax is None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of (flat) blocks, the last one possibly partial."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored per-tensor data: codes, scales and offset.

        The code books (``code``, ``nested_code``) are constants shared by every tensor of a
        type and are not counted, so NF4 with double quantization at blocksize 64 costs
        ``4 + 8/64 + 32/(64*256)`` bits per parameter plus 4 bytes for the offset.
        """
        stored = (self.packed, self.absmax, self.absmax_codes, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor-valued fields by name (None where absent)."""
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS}

    # ---------------------------------------------------------------- math
    @classmethod
    @torch.no_grad()
    def from_tensor(
        cls,
        t: torch.Tensor,
        blocksize: int = DEFAULT_BLOCKSIZE_4BIT,
        quant_type: str = "nf4",
        double_quant: bool = False,
    ) -> QuantizedTensor:
        """Quantize ``t`` blockwise to 4 bits, byte-identical to bitsandbytes' ``quantize_4bit``.

        Args:
            t: float32, float16 or bfloat16 tensor of any shape (not empty, all values finite).
            blocksize: elements per block, one of :data:`~loraq.quant.VALID_BLOCKSIZES`.
            quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
            double_quant: also quantize the block absmax values to 8 bits (bitsandbytes'
                ``compress_statistics=True``), 4.127 instead of 4.5 bits per parameter at
                blocksize 64.

        Returns:
            A record whose ``packed`` and (for ``double_quant=False``) ``absmax`` equal
            bitsandbytes' output. With double quantization the 8-bit absmax codes are exactly
            nearest; bitsandbytes' CPU kernel differs from that in a few entries.

        Raises:
            ValueError: for a non-float dtype, an empty tensor, NaN/Inf values, an unsupported
                blocksize or an unknown quant_type.
        """
        packed, absmax = quantize_4bit_blocks(t, blocksize, quant_type)
        fields = dict(
            packed=packed,
            shape=t.shape,
            dtype=t.dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            # Each record owns its code books: in-place edits cannot reach the shared constants,
            # and a state dict of many layers holds no shared tensors (which safetensors refuses).
            code=code_4bit(quant_type).to(t.device, copy=True),
        )
        if not double_quant:
            return cls(absmax=absmax, **fields)
        offset = absmax.mean()
        codes, nested_absmax = quantize_8bit_blocks(absmax - offset, NESTED_BLOCKSIZE)
        return cls(
            absmax_codes=codes,
            nested_absmax=nested_absmax,
            nested_code=dynamic_map().to(t.device, copy=True),
            offset=offset,
            nested_blocksize=NESTED_BLOCKSIZE,
            **fields,
        )

    def block_absmax(self) -> torch.Tensor:
        """Float32 per-block scales (dequantized from 8 bits under double quantization)."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax_codes.numel()
        out = torch.empty(n, dtype=torch.float32, device=self.absmax_codes.device)
        dequantize_8bit_blocks(
            self.absmax_codes,
            self.nested_code,
            self.nested_absmax,
            self.nested_blocksize,
            0,
            n,
            out,
        )
        return out.add_(self.offset)  # a separate rounding, as bitsandbytes (not an FMA)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor: ``code[nibble] * absmax`` in float32, cast once to ``dtype``.

        ``dtype`` defaults to the dtype the tensor had before quantization. The result has the
        original shape and is bit-identical to that definition applied to bitsandbytes' state.
        """
        dtype = resolve_dtype(dtype, self.dtype)
        out = empty_for_write(self.numel, dtype, self.device)
        return self.dequantize_range(0, self.numel, out).view(self.shape)

    def dequantize_range(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize flat elements ``[start, stop)`` into the 1-D ``out`` (``start`` a multiple
        of the blocksize); see :func:`~loraq.quant.blockwise.dequantize_4bit_blocks`."""
        if start == 0 and self.double_quant:
            # the compiled kernel decodes the 8-bit block scales on the fly (one pass, no array)
            scales = cpu_kernels.NestedScales(
                self.absmax_codes,
                self.nested_code,
                self.nested_absmax,
                self.nested_blocksize,
                float(self.offset),
            )
            if cpu_kernels.dequantize_4bit_nested_into(
                self.packed, scales, self.code, self.blocksize, stop, out
            ):
                return out
        return dequantize_4bit_blocks(
            self.packed, self.code, self.block_absmax(), self.blocksize, start, stop, out
        )

    @torch.no_grad()
    def dequantize_elements(
        self, index: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Dequantize only the flat elements ``index`` (int64, any shape).

        Bit-identical to ``self.dequantize(dtype).reshape(-1)[index]`` without materialising the
        dense tensor; used by embedding lookups, which need a few rows of a large table.
        """
        dtype = resolve_dtype(dtype, self.dtype)
        flat = self.packed.reshape(-1).view(torch.uint8)
        byte = flat[index >> 1].to(torch.int64)
        # Even flat indices sit in the high nibble.
        nibble = torch.where((index & 1).bool(), byte & 0xF, byte >> 4)
        block = index // self.blocksize
        if self.double_quant:  # only the touched blocks' scales, same two roundings as above
            nested = self.nested_absmax[block // self.nested_blocksize]
            codes = self.absmax_codes[block].to(torch.int64)
            absmax = self.nested_code[codes] * nested + self.offset
        else:
            absmax = self.absmax[block]
        return (self.code[nibble] * absmax).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every tensor moved to ``device`` (dtypes never change)."""
        moved = {k: (None if t is None else t.to(device)) for k, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    # ---------------------------------------------------------------- serialisation
    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            meta["nested_blocksize"] = self.nested_blocksize
            meta["nested_dtype"] = "float32"
            meta["nested_offset"] = self.offset.item()  # float of the fp32 value: exact round trip
        return meta

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' keys ``<prefix>weight``, ``<prefix>weight.absmax``, ...

        The layout is the one ``bnb.nn.Linear4bit`` and transformers save, so bitsandbytes'
        ``QuantState.from_dict`` / ``Params4bit.from_prequantized`` load it unchanged.
        """
        key = prefix + "weight"
        sd = {key: self.packed}
        if self.double_quant:
            sd[key + ".absmax"] = self.absmax_codes
            sd[key + ".quant_map"] = self.code
            sd[key + ".nested_absmax"] = self.nested_absmax
            sd[key + ".nested_quant_map"] = self.nested_code
        else:
            sd[key + ".absmax"] = self.absmax
            sd[key + ".quant_map"] = self.code
        sd[f"{key}.quant_state.bitsandbytes__{self.quant_type}"] = json_tensor(self._meta())
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedTensor:
        """Rebuild a record from :meth:`to_state_dict` output or a bitsandbytes/transformers file.

        Packed data stored with another ``quant_storage`` dtype is reinterpreted as bytes.

        Raises:
            ValueError: naming the missing key, or the key whose dtype, shape or JSON is wrong.
        """
        key = prefix + "weight"
        state_keys = [f"{key}.quant_state.{kind}" for kind in cls.STATE_KINDS]
        found = [k for k in state_keys if k in sd]
        if not found:
            raise ValueError(
                f"state dict is missing quantized-weight keys: {' or '.join(state_keys)}"
            )
        if len(found) > 1:
            raise ValueError(f"state dict has both {found[0]} and {found[1]}")
        state_key = found[0]
        meta = read_json(sd[state_key], state_key)
        quant_type = meta_field(meta, "quant_type", state_key)
        if state_key != f"{key}.quant_state.bitsandbytes__{quant_type}":
            raise ValueError(f"{state_key}: JSON quant_type {quant_type!r} does not match the key")
        shape = meta_shape(meta, state_key)
        dtype = meta_dtype(meta, "dtype", state_key)
        blocksize = meta_blocksize(meta, "blocksize", state_key)
        nested = "nested_offset" in meta
        require_keys(sd, [key, key + ".absmax", key + ".quant_map"])
        if nested:
            require_keys(sd, [key + ".nested_absmax", key + ".nested_quant_map"])

        n = math.prod(shape)
        n_blocks = -(-n // blocksize)
        raw = sd[key]
        if not isinstance(raw, torch.Tensor):
            raise ValueError(f"{key}: expected a tensor, got {type(raw).__name__}")
        try:  # bitsandbytes may store the bytes as another quant_storage dtype
            packed = raw.contiguous().view(torch.uint8).reshape(-1, 1)
        except RuntimeError:
            packed = None
        if packed is None or packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"{key}: expected {(n + 1) // 2} packed bytes for shape {tuple(shape)}, "
                f"got {raw.dtype} {tuple(raw.shape)}"
            )
        code = take_tensor(sd, key + ".quant_map", torch.float32, (16,))
        fields: dict[str, Any] = dict(
            packed=packed,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
        )
        if not nested:
            fields["absmax"] = take_tensor(sd, key + ".absmax", torch.float32, (n_blocks,))
            return cls(**fields)
        nested_blocksize = int(meta_field(meta, "nested_blocksize", state_key))
        if nested_blocksize <= 0:
            raise ValueError(
                f"{state_key}: nested_blocksize must be positive, got {nested_blocksize}"
            )
        if meta_field(meta, "nested_dtype", state_key) != "float32":
            raise ValueError(
                f"{state_key}: nested_dtype must be 'float32', got {meta['nested_dtype']!r}"
            )
        offset_value = meta_field(meta, "nested_offset", state_key)
        if not isinstance(offset_value, (int, float)):
            raise ValueError(f"{state_key}: nested_offset must be a number, got {offset_value!r}")
        return cls(
            absmax_codes=take_tensor(sd, key + ".absmax", torch.uint8, (n_blocks,)),
            nested_absmax=take_tensor(
                sd, key + ".nested_absmax", torch.float32, (-(-n_blocks // nested_blocksize),)
            ),
            nested_code=take_tensor(sd, key + ".nested_quant_map", torch.float32, (256,)),
            offset=torch.tensor(float(offset_value), dtype=torch.float32, device=packed.device),
            nested_blocksize=nested_blocksize,
            **fields,
        )


# ------------------------------------------------------------------------------- functional forms
def quantize_4bit(
    t: torch.Tensor,
    blocksize: int = DEFAULT_BLOCKSIZE_4BIT,
    quant_type: str = "nf4",
    double_quant: bool = False,
) -> QuantizedTensor:
    """:meth:`QuantizedTensor.from_tensor` as a function (bitsandbytes' spelling)."""
    return QuantizedTensor.from_tensor(t, blocksize, quant_type, double_quant)


def dequantize_4bit(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:meth:`QuantizedTensor.dequantize` as a function."""
    return q.dequantize(dtype)
