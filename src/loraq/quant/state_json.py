"""The JSON quant-state tensor and checked reads of state-dict entries, shared by the records.

A quantized weight's metadata travels in its state dict as a uint8 tensor of UTF-8 JSON (as
bitsandbytes' ``pack_dict_to_tensor`` writes it); the readers here name the offending key in
every error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ..core.dtypes import FLOAT_DTYPES
from .codebooks import VALID_BLOCKSIZES


def json_tensor(meta: dict[str, Any]) -> torch.Tensor:
    """UTF-8 JSON bytes of ``meta`` as a 1-D uint8 tensor (bitsandbytes' ``pack_dict_to_tensor``)."""
    # bitsandbytes' pack_dict_to_tensor: json.dumps with default separators, UTF-8 bytes.
    data = bytearray(json.dumps(meta).encode("utf-8"))
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def read_json(t: torch.Tensor, key: str) -> dict[str, Any]:
    """The JSON object stored in the uint8 tensor ``t`` under ``key``; ``ValueError`` naming ``key``."""
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


def take_tensor(
    sd: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """``sd[key]``, checked to be a tensor of ``dtype`` and ``shape``; ``ValueError`` naming ``key``."""
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def require_keys(sd: Mapping[str, Any], keys: list[str]) -> None:
    """Raise ``ValueError`` listing the ``keys`` missing from ``sd``."""
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"state dict is missing quantized-weight keys: {', '.join(missing)}")


def meta_field(meta: dict[str, Any], name: str, key: str) -> Any:
    """``meta[name]``; ``ValueError`` naming ``key`` when absent."""
    if name not in meta:
        raise ValueError(f"{key}: JSON lacks the field {name!r}")
    return meta[name]


def meta_dtype(meta: dict[str, Any], name: str, key: str) -> torch.dtype:
    """The float dtype named by ``meta[name]``; ``ValueError`` for any other name."""
    value = meta_field(meta, name, key)
    if value not in FLOAT_DTYPES:
        raise ValueError(
            f"{key}: unsupported {name} {value!r}, expected one of {sorted(FLOAT_DTYPES)}"
        )
    return FLOAT_DTYPES[value]


def meta_shape(meta: dict[str, Any], key: str) -> torch.Size:
    """``meta['shape']`` as a ``torch.Size`` of non-negative integers."""
    shape = meta_field(meta, "shape", key)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{key}: shape must be a list of non-negative integers, got {shape!r}")
    return torch.Size(shape)


def meta_blocksize(meta: dict[str, Any], name: str, key: str) -> int:
    """``meta[name]`` checked to be one of the valid blocksizes."""
    value = meta_field(meta, name, key)
    if value not in VALID_BLOCKSIZES:
        raise ValueError(f"{key}: unsupported {name} {value!r}, expected one of {VALID_BLOCKSIZES}")
    return int(value)
