"""Compiled k-quant quantizers (``kquant.c``), the fast twin of :mod:`loraq.quant.kquants`.

The PyTorch module is the reference and the fallback: it runs the search for all blocks at
once, but its element-by-element sums cost one small tensor operation each, so a real model
takes minutes. The kernel runs the same float32 operations in the same order, one block at a
time, and writes the same bytes (tests compare the two). Built on first use by
:mod:`loraq.native.build`; ``LORAQ_KERNELS=off`` keeps the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .build import load_library, shares_torch_openmp

__all__ = ["KERNEL_TYPES", "available", "quantize_kquant_into"]

_SOURCE = Path(__file__).with_name("kquant.c")
#: Block formats the kernel writes, with their bytes per 256-value super-block.
KERNEL_TYPES: dict[str, int] = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
# Super-blocks below which one thread does it all (handing off costs more than it saves).
_PARALLEL_MIN_BLOCKS = 256


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "k-quant quantizer", openmp=shares_torch_openmp())
    if lib is None:
        return None
    lib.loraq_openmp.argtypes, lib.loraq_openmp.restype = [], ctypes.c_int
    lib.splits_itself = bool(lib.loraq_openmp())
    for name in KERNEL_TYPES:
        fn = getattr(lib, f"loraq_quantize_{name}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        fn.restype = None
    return lib


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraq-kquant")


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on the first call)."""
    return _library() is not None


def quantize_kquant_into(x: torch.Tensor, quant_type: str, out: torch.Tensor) -> bool:
    """Quantize float32 super-blocks ``x`` (n, 256) into uint8 ``out`` (n, type size).

    False (nothing written) when the kernel is unavailable or the tensors do not fit it (not
    CPU, not contiguous); the caller then uses the PyTorch path.
    """
    lib = _library()
    size = KERNEL_TYPES.get(quant_type)
    n = x.shape[0]
    fits = (
        lib is not None
        and size is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and tuple(x.shape) == (n, 256)
        and out.device.type == "cpu"
        and out.dtype == torch.uint8
        and out.is_contiguous()
        and tuple(out.shape) == (n, size)
    )
    if not fits:
        return False
    fn = getattr(lib, f"loraq_quantize_{quant_type}")
    src, dst = x.data_ptr(), out.data_ptr()
    workers = max(1, min(torch.get_num_threads(), n // _PARALLEL_MIN_BLOCKS))
    if workers == 1 or lib.splits_itself:
        fn(src, dst, 0, n)
        return True
    step = -(-n // workers)
    jobs = [
        _pool(workers - 1).submit(fn, src, dst, lo, min(lo + step, n))
        for lo in range(step, n, step)
    ]
    fn(src, dst, 0, min(step, n))
    for job in jobs:
        job.result()  # ctypes releases the GIL, so the slices run in parallel
    return True
