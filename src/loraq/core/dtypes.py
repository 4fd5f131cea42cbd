"""The floating-point dtypes loraq stores and computes in, and their names in files and configs.

One table for every place that turns a dtype name (``LoraConfig.compute_dtype``, the JSON of a
quantized weight, ``config.json``, ``export_merged(dtype=...)``, ``--dtype``) into a
``torch.dtype`` or back. A leaf module: it imports nothing from loraq.
"""

from __future__ import annotations

import torch

#: Names and dtypes of the floating-point formats loraq accepts for weights and compute.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: The accepted names, in the table's order.
FLOAT_DTYPE_NAMES: tuple[str, ...] = tuple(FLOAT_DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name transformers and bitsandbytes write)."""
    return str(dtype).removeprefix("torch.")


def float_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` called ``name``; ``ValueError`` naming ``what`` for any other name."""
    try:
        return FLOAT_DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unsupported {what} {name!r}, expected one of {list(FLOAT_DTYPE_NAMES)}"
        ) from None
