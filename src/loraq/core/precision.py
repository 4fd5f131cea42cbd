"""Compute precision: which dtype the hardware runs fast, and what autocast is asking for.

``compute_dtype: auto`` resolves here, once, to a concrete dtype:

==========================================  ===========  ===================================
device                                      ``auto``     why
==========================================  ===========  ===================================
CUDA with bf16 (compute capability >= 8.0)  bfloat16     tensor cores run bf16 at full rate
CPU with AVX512-BF16 or AMX                 bfloat16     oneDNN has native bf16 GEMM kernels
any other CPU (AVX2-only, ARM, ...)         float32      bf16 GEMM is emulated: many times
                                                         slower than float32, not faster
other CUDA, MPS, ...                        float32      no fast bf16 path to rely on
==========================================  ===========  ===================================

``LORAQ_CPU_BF16`` overrides the CPU row (spelled as every switch, :mod:`loraq.core.switches`):
``on`` treats this CPU as one with AVX512-BF16/AMX, ``off`` as one without, ``auto`` (default)
asks the CPU. It lets the bf16 path most users' hardware runs be tested on an AVX2-only machine
(bf16 is emulated there: correct, only slower), and an AMX machine run as a float32 one.

This module imports only the leaves ``loraq.core.dtypes`` and ``loraq.core.switches``, so every
layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .dtypes import FLOAT_DTYPE_NAMES, FLOAT_DTYPES
from .switches import read_switch

__all__ = [
    "COMPUTE_DTYPE_NAMES",
    "CPU_BF16_ENV",
    "autocast_dtype",
    "autocast_for",
    "fast_bf16",
    "resolve_compute_dtype",
]

#: Names accepted wherever a compute dtype is configured; ``auto`` picks per device (above).
COMPUTE_DTYPE_NAMES: tuple[str, ...] = ("auto", *FLOAT_DTYPE_NAMES)
#: Environment variable that overrides whether this CPU counts as bf16-capable (see above).
CPU_BF16_ENV = "LORAQ_CPU_BF16"
# CPU feature flags (Linux /proc/cpuinfo names) that give native bf16 dot products.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    # torch's own probes (private, present since 2.3) see through virtualisation the same way
    # oneDNN does; /proc/cpuinfo is the fallback where they are missing.
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [getattr(torch.cpu, n, None) for n in names]
    probes = [p for p in probes if callable(p)]
    if probes:
        return any(bool(p()) for p in probes)
    return bool(_cpu_flags() & set(_BF16_CPU_FLAGS))


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (faster than float32); for the CPU,
    :data:`CPU_BF16_ENV` overrides the answer.

    Raises:
        ValueError: for a value of :data:`CPU_BF16_ENV` that is not a switch position.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no emulation flag
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        forced = read_switch(CPU_BF16_ENV)  # read on every call: tests switch it per case
        return _cpu_has_fast_bf16() if forced == "auto" else forced == "on"
    return False


def resolve_compute_dtype(
    name: str | torch.dtype, device: torch.device | str = "cpu"
) -> torch.dtype:
    """The torch dtype for a configured compute dtype; ``"auto"`` picks per ``device`` (see table).

    Raises:
        ValueError: for a name outside :data:`COMPUTE_DTYPE_NAMES`.
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if name not in FLOAT_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}: expected one of {COMPUTE_DTYPE_NAMES}")
    return FLOAT_DTYPES[name]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast is casting matmuls to on ``device_type`` right now, or None if it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_for(
    dtype: torch.dtype, device: torch.device | str
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for float32.

    A training step under it keeps float32 master weights and optimizer state; losses such as
    cross-entropy run in float32 (autocast's own rule for them).
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
