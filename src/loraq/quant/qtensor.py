"""Records holding a blockwise-quantized tensor, and their state-dict layouts.

:class:`QuantizedTensor` is the 4-bit record (bitsandbytes' ``Params4bit`` data plus its
``QuantState``, as plain fields). Its state dict uses exactly the keys and bytes that
``bnb.nn.Linear4bit`` and transformers write (``reference/formats.md`` §4.1)::

    <prefix>weight                                   uint8 ((n + 1) // 2, 1)  packed nibbles
    <prefix>weight.absmax                            float32 (n_blocks,), or uint8 codes with DQ
    <prefix>weight.quant_map                         float32 (16,)
    <prefix>weight.nested_absmax                     float32 (ceil(n_blocks / 256),)   DQ only
    <prefix>weight.nested_quant_map                  float32 (256,)                    DQ only
    <prefix>weight.quant_state.bitsandbytes__<type>  uint8 JSON: quant_type, blocksize, dtype,
                                                     shape[, nested_blocksize, nested_dtype,
                                                     nested_offset]

:class:`QuantizedTensor8` is loraq's 8-bit blockwise record (dynamic map, one code per byte).
bitsandbytes has no module for this format (its ``Linear8bitLt`` is LLM.int8, row-wise int8 with
an ``SCB`` scale), so the layout is our own, shaped like the 4-bit one::

    <prefix>weight                                   uint8, the original shape
    <prefix>weight.absmax                            float32 (n_blocks,)
    <prefix>weight.quant_map                         float32 (256,)
    <prefix>weight.quant_state.loraq__dynamic        uint8 JSON: quant_type, blocksize, dtype, shape

The dequantization math lives in :mod:`loraq.quant.blockwise`; the methods here delegate to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NESTED_BLOCKSIZE", "VALID_BLOCKSIZES", "QuantizedTensor", "QuantizedTensor8"]

#: Blocksize of the second (8-bit) level of double quantization.
NESTED_BLOCKSIZE = 256
#: Blocksizes accepted for 4-bit and 8-bit blockwise quantization (as bitsandbytes).
VALID_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_tensor(meta: dict[str, Any]) -> torch.Tensor:
    # bitsandbytes' pack_dict_to_tensor: json.dumps with default separators, UTF-8 bytes.
    data = bytearray(json.dumps(meta).encode("utf-8"))
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def _read_json(t: torch.Tensor, key: str) -> dict[str, Any]:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(
            f"{key}: expected a 1-D uint8 tensor of JSON bytes, got {t.dtype} {tuple(t.shape)}"
        )
    try:
        meta = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: expected a JSON object")
    return meta


def _take(
    sd: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def _require(sd: Mapping[str, Any], keys: list[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state dict is missing quantized-weight keys: {', '.join(missing)}")


def _meta_field(meta: dict[str, Any], name: str, key: str) -> Any:
    if name not in meta:
        raise ValueError(f"{key}: JSON lacks the field {name!r}")
    return meta[name]


def _meta_dtype(meta: dict[str, Any], name: str, key: str) -> torch.dtype:
    value = _meta_field(meta, name, key)
    if value not in _FLOAT_DTYPES:
        raise ValueError(
            f"{key}: unsupported {name} {value!r}, expected one of {sorted(_FLOAT_DTYPES)}"
        )
    return _FLOAT_DTYPES[value]


def _meta_shape(meta: dict[str, Any], key: str) -> torch.Size:
    shape = _meta_field(meta, "shape", key)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{key}: shape must be a list of non-negative integers, got {shape!r}")
    return torch.Size(shape)


def _meta_blocksize(meta: dict[str, Any], name: str, key: str) -> int:
    value = _meta_field(meta, name, key)
    if value not in VALID_BLOCKSIZES:
        raise ValueError(f"{key}: unsupported {name} {value!r}, expected one of {VALID_BLOCKSIZES}")
    return int(value)


@dataclass(eq=False)
class QuantizedTensor:
    """A tensor stored in 4-bit blocks (NF4 or FP4), optionally with double-quantized scales.

    Attributes:
        packed: uint8 ``((n + 1) // 2, 1)``; two codes per byte, even index in the high nibble.
        shape: the original shape. dtype: the original dtype (the default dequantization dtype).
        blocksize: elements per block (flat, row-major). quant_type: ``"nf4"`` or ``"fp4"``.
        code: the 16-entry float32 code book.
        absmax: float32 ``(n_blocks,)`` block scales, or None under double quantization, where
            ``absmax_codes`` (uint8 ``(n_blocks,)``), ``nested_absmax`` (float32, one per
            ``nested_blocksize`` blocks), ``nested_code`` (the 256-entry dynamic map) and
            ``offset`` (float32 0-dim, the mean subtracted first) describe them instead.

    Build one with :func:`loraq.quant.quantize_4bit` or :meth:`from_state_dict`.
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
    def block_absmax(self) -> torch.Tensor:
        """Float32 per-block scales (dequantized from 8 bits under double quantization)."""
        from .blockwise import block_absmax

        return block_absmax(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor in ``dtype`` (default: the original dtype); see :func:`dequantize_4bit`."""
        from .blockwise import dequantize_4bit

        return dequantize_4bit(self, dtype)

    def dequantize_range(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize flat elements ``[start, stop)`` into ``out``; see ``dequantize_4bit_range``."""
        from .blockwise import dequantize_4bit_range

        return dequantize_4bit_range(self, start, stop, out)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every tensor moved to ``device`` (dtypes never change)."""
        moved = {k: (None if t is None else t.to(device)) for k, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    # ---------------------------------------------------------------- serialisation
    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
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
        sd[f"{key}.quant_state.bitsandbytes__{self.quant_type}"] = _json_tensor(self._meta())
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedTensor:
        """Rebuild a record from :meth:`to_state_dict` output or a bitsandbytes/transformers file.

        Packed data stored with another ``quant_storage`` dtype is reinterpreted as bytes.

        Raises:
            ValueError: naming the missing key, or the key whose dtype, shape or JSON is wrong.
        """
        key = prefix + "weight"
        state_keys = [f"{key}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")]
        found = [k for k in state_keys if k in sd]
        if not found:
            raise ValueError(
                f"state dict is missing quantized-weight keys: {' or '.join(state_keys)}"
            )
        if len(found) > 1:
            raise ValueError(f"state dict has both {found[0]} and {found[1]}")
        state_key = found[0]
        meta = _read_json(sd[state_key], state_key)
        quant_type = _meta_field(meta, "quant_type", state_key)
        if state_key != f"{key}.quant_state.bitsandbytes__{quant_type}":
            raise ValueError(f"{state_key}: JSON quant_type {quant_type!r} does not match the key")
        shape = _meta_shape(meta, state_key)
        dtype = _meta_dtype(meta, "dtype", state_key)
        blocksize = _meta_blocksize(meta, "blocksize", state_key)
        nested = "nested_offset" in meta
        _require(sd, [key, key + ".absmax", key + ".quant_map"])
        if nested:
            _require(sd, [key + ".nested_absmax", key + ".nested_quant_map"])

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
        code = _take(sd, key + ".quant_map", torch.float32, (16,))
        fields: dict[str, Any] = dict(
            packed=packed,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
        )
        if not nested:
            fields["absmax"] = _take(sd, key + ".absmax", torch.float32, (n_blocks,))
            return cls(**fields)
        nested_blocksize = int(_meta_field(meta, "nested_blocksize", state_key))
        if nested_blocksize <= 0:
            raise ValueError(
                f"{state_key}: nested_blocksize must be positive, got {nested_blocksize}"
            )
        if _meta_field(meta, "nested_dtype", state_key) != "float32":
            raise ValueError(
                f"{state_key}: nested_dtype must be 'float32', got {meta['nested_dtype']!r}"
            )
        offset_value = _meta_field(meta, "nested_offset", state_key)
        if not isinstance(offset_value, (int, float)):
            raise ValueError(f"{state_key}: nested_offset must be a number, got {offset_value!r}")
        return cls(
            absmax_codes=_take(sd, key + ".absmax", torch.uint8, (n_blocks,)),
            nested_absmax=_take(
                sd, key + ".nested_absmax", torch.float32, (-(-n_blocks // nested_blocksize),)
            ),
            nested_code=_take(sd, key + ".nested_quant_map", torch.float32, (256,)),
            offset=torch.tensor(float(offset_value), dtype=torch.float32, device=packed.device),
            nested_blocksize=nested_blocksize,
            **fields,
        )


@dataclass(eq=False)
class QuantizedTensor8:
    """A tensor stored as 8-bit blockwise codes of the dynamic map (one code per byte).

    Attributes:
        codes: uint8 in the original shape. absmax: float32 ``(n_blocks,)`` (flat blocks).
        code: the 256-entry float32 map. blocksize: elements per block. dtype: original dtype.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype

    #: The format's name in the state-dict JSON.
    quant_type = "dynamic"
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

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor in ``dtype`` (default: the original dtype); see :func:`dequantize_8bit`."""
        from .blockwise import dequantize_8bit

        return dequantize_8bit(self, dtype)

    def dequantize_range(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize flat elements ``[start, stop)`` into ``out``; see ``dequantize_8bit_range``."""
        from .blockwise import dequantize_8bit_range

        return dequantize_8bit_range(self, start, stop, out)

    def to(self, device: torch.device | str) -> QuantizedTensor8:
        """A copy with every tensor moved to ``device`` (dtypes never change)."""
        moved = {k: t.to(device) for k, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under ``<prefix>weight``, ``.absmax``, ``.quant_map`` and the JSON state key."""
        key = prefix + "weight"
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        return {
            key: self.codes,
            key + ".absmax": self.absmax,
            key + ".quant_map": self.code,
            f"{key}.quant_state.loraq__{self.quant_type}": _json_tensor(meta),
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedTensor8:
        """Inverse of :meth:`to_state_dict`; raises ValueError naming a missing or malformed key."""
        key = prefix + "weight"
        state_key = f"{key}.quant_state.loraq__{cls.quant_type}"
        _require(sd, [key, key + ".absmax", key + ".quant_map", state_key])
        meta = _read_json(sd[state_key], state_key)
        if _meta_field(meta, "quant_type", state_key) != cls.quant_type:
            raise ValueError(
                f"{state_key}: quant_type must be {cls.quant_type!r}, got {meta['quant_type']!r}"
            )
        shape = _meta_shape(meta, state_key)
        blocksize = _meta_blocksize(meta, "blocksize", state_key)
        n_blocks = -(-math.prod(shape) // blocksize)
        return cls(
            codes=_take(sd, key, torch.uint8, tuple(shape)),
            absmax=_take(sd, key + ".absmax", torch.float32, (n_blocks,)),
            code=_take(sd, key + ".quant_map", torch.float32, (256,)),
            blocksize=blocksize,
            dtype=_meta_dtype(meta, "dtype", state_key),
        )
