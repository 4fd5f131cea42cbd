"""Compiled CPU dequantization: a small C kernel (``dequant.c``) built on first use.

The pure-PyTorch code in :mod:`loraq.quant.blockwise` stays the reference and the fallback:
the kernel computes the same float32 product and the same round-to-nearest-even bfloat16, so
its output is bit-identical (tests compare the two). What it saves is memory traffic: one pass
writes each output element once, where the PyTorch path needs an index copy, a table gather and
a scaling pass.

It is built on first use by :mod:`loraq.native.build` (no compiler is needed to install loraq;
without one, loraq warns once and keeps the pure-PyTorch path). ``LORAQ_KERNELS`` selects
``auto`` / ``off`` / ``on`` for every compiled kernel.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import MODE_ENV, load_library, mode, shares_torch_openmp

__all__ = [
    "MODE_ENV",
    "NestedScales",
    "available",
    "dequantize_4bit_into",
    "dequantize_4bit_nested_into",
    "dequantize_8bit_into",
    "dequantize_gguf_into",
    "gguf_matmul",
    "mode",
    "packed_matmul",
]

_SOURCE = Path(__file__).with_name("dequant.c")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Where the kernel has no OpenMP (see dequant.c), below this many elements one thread does it
# all. A slice handed to a Python pool thread competes for a core with PyTorch's OpenMP workers,
# which spin for a while after every parallel op: right after a matmul (as in training) a second
# thread saved nothing on an 8M-element weight, and the hand-off itself costs a few hundred
# microseconds on small ones.
_PARALLEL_MIN = 1 << 24


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "dequantize", openmp=shares_torch_openmp())
    if lib is None:
        return None
    lib.loraq_openmp.argtypes, lib.loraq_openmp.restype = [], ctypes.c_int
    lib.splits_itself = bool(lib.loraq_openmp())  # asked once, not on every dequantize
    tail = [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int]
    for fn in (lib.loraq_dequant4, lib.loraq_dequant8):
        fn.argtypes, fn.restype = [ctypes.c_void_p] * 3 + tail, None
    nested = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]
    lib.loraq_dequant4_nested.argtypes, lib.loraq_dequant4_nested.restype = nested + tail, None
    lib.loraq_dequant_gguf.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    lib.loraq_dequant_gguf.restype = None
    lib.loraq_gguf_matmul.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.loraq_gguf_matmul.restype = None
    lib.loraq_dequant_kquant.argtypes = lib.loraq_dequant_gguf.argtypes
    lib.loraq_dequant_kquant.restype = None
    return lib


@dataclass(frozen=True)
class NestedScales:
    """Double-quantized block scales: uint8 ``codes`` (one per block) into the 256-entry
    float32 ``code`` book, float32 ``absmax`` per ``blocksize`` codes, and the float ``offset``
    added after scaling."""

    codes: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    offset: float


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraq-dequant")


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on the first call)."""
    return _library() is not None


def _usable(codes, absmax, code, out, table_size: int) -> bool:
    return (
        out.device.type == "cpu"
        and out.dtype in _DTYPE_CODES
        and out.is_contiguous()
        and codes.device.type == "cpu"
        and codes.dtype == torch.uint8
        and codes.is_contiguous()
        and absmax.dtype == torch.float32
        and absmax.is_contiguous()
        and code.dtype == torch.float32
        and code.is_contiguous()
        and code.numel() == table_size
        and not out.requires_grad
    )


def _in_slices(call, units: int, elements: int) -> None:
    """``call(first, last)`` over ``[0, units)``: in one call when the kernel splits the work
    across PyTorch's OpenMP threads itself or for fewer than :data:`_PARALLEL_MIN` elements,
    else in one slice per thread (``torch.get_num_threads()``), the calling thread taking the
    first slice itself (one hand-off fewer to wait for)."""
    workers = max(1, min(torch.get_num_threads(), units))
    if elements < _PARALLEL_MIN or workers == 1 or _library().splits_itself:
        call(0, units)
        return
    step = -(-units // workers)
    pool = _pool(workers - 1)
    jobs = [pool.submit(call, lo, min(lo + step, units)) for lo in range(step, units, step)]
    call(0, min(step, units))
    for job in jobs:
        job.result()  # ctypes releases the GIL, so the slices run in parallel


def _run(fn, head: tuple, blocksize: int, n: int, out: torch.Tensor) -> None:
    """``fn(*head, blocksize, n, first_block, last_block, out, dtype)`` over slices of blocks."""
    out_ptr, dtype = out.data_ptr(), _DTYPE_CODES[out.dtype]
    _in_slices(
        lambda lo, hi: fn(*head, blocksize, n, lo, hi, out_ptr, dtype), -(-n // blocksize), n
    )


def _ptrs(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in tensors)


def dequantize_4bit_nested_into(
    packed: torch.Tensor,
    scales: NestedScales,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor,
) -> bool:
    """:func:`dequantize_4bit_into` for double-quantized block scales, decoded on the fly.

    Block ``b``'s scale is ``scales.code[scales.codes[b]] * scales.absmax[b // scales.blocksize]
    + scales.offset`` (two float32 roundings), as the pure path computes it into a separate
    array first. False (nothing written) when the kernel or the tensors do not fit.
    """
    lib = _library()
    flat = packed.reshape(-1)
    n_blocks = -(-n // blocksize)
    if lib is None or out.numel() < n or not _usable(flat, scales.absmax, code, out, 16):
        return False
    codes, nested_code = scales.codes.reshape(-1), scales.code
    if not _usable(codes, scales.absmax, nested_code, out, 256) or codes.numel() < n_blocks:
        return False
    if flat.numel() < (n + 1) // 2 or scales.absmax.numel() < -(-n_blocks // scales.blocksize):
        return False
    head = (
        *_ptrs(flat, codes, nested_code, scales.absmax),
        scales.blocksize,
        scales.offset,
        code.data_ptr(),
    )
    _run(lib.loraq_dequant4_nested, head, blocksize, n, out)
    return True


def dequantize_4bit_into(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor,
) -> bool:
    """Write flat elements ``[0, n)`` of a packed 4-bit tensor into ``out``; False if not handled.

    ``packed``: uint8 bytes (two codes each, even element high); ``absmax``: float32 per block;
    ``code``: the 16-entry float32 code book; ``out``: contiguous float32 or bfloat16 CPU tensor
    with at least ``n`` elements. Returns False (and writes nothing) when the kernel is off or
    unavailable or the tensors do not fit its contract; the caller then uses the PyTorch path.
    """
    lib = _library()
    flat = packed.reshape(-1)
    if lib is None or out.numel() < n or not _usable(flat, absmax, code, out, 16):
        return False
    if flat.numel() < (n + 1) // 2 or absmax.numel() < -(-n // blocksize):
        return False
    _run(lib.loraq_dequant4, _ptrs(flat, absmax, code), blocksize, n, out)
    return True


def dequantize_8bit_into(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor,
) -> bool:
    """8-bit counterpart of :func:`dequantize_4bit_into` (one code per byte, 256-entry book)."""
    lib = _library()
    flat = codes.reshape(-1)
    if lib is None or out.numel() < n or not _usable(flat, absmax, code, out, 256):
        return False
    if flat.numel() < n or absmax.numel() < -(-n // blocksize):
        return False
    _run(lib.loraq_dequant8, _ptrs(flat, absmax, code), blocksize, n, out)
    return True


#: GGUF formats the kernel handles: name -> (C function, kind code in dequant.c, bytes per
#: block, elements per block).
_GGUF_KINDS = {
    "q8_0": ("loraq_dequant_gguf", 0, 34, 32),
    "q4_0": ("loraq_dequant_gguf", 1, 18, 32),
    "q4_1": ("loraq_dequant_gguf", 2, 20, 32),
    "q4_k": ("loraq_dequant_kquant", 0, 144, 256),
    "q5_k": ("loraq_dequant_kquant", 1, 176, 256),
    "q6_k": ("loraq_dequant_kquant", 2, 210, 256),
}


def dequantize_gguf_into(
    blocks: torch.Tensor, quant_type: str, first_block: int, count: int, out: torch.Tensor
) -> bool:
    """Write GGUF blocks ``[first_block, first_block + count)`` (``q8_0``, ``q4_0``, ``q4_1``,
    ``q4_k``, ``q5_k``, ``q6_k``) into the flat ``out`` (``count`` blocks of elements); False if
    not handled (see :func:`dequantize_4bit_into`), and the caller uses
    :mod:`loraq.quant.gguf`'s PyTorch path."""
    lib = _library()
    if lib is None or quant_type not in _GGUF_KINDS:
        return False
    fn_name, kind, size, elements = _GGUF_KINDS[quant_type]
    flat = blocks.reshape(-1)
    fits = (
        out.device.type == "cpu"
        and out.dtype in _DTYPE_CODES
        and out.is_contiguous()
        and not out.requires_grad
        and out.numel() == elements * count
        and flat.device.type == "cpu"
        and flat.dtype == torch.uint8
        and flat.is_contiguous()
        and flat.numel() >= (first_block + count) * size
    )
    if not fits:
        return False
    src, dst, dtype = flat.data_ptr() + first_block * size, out.data_ptr(), _DTYPE_CODES[out.dtype]
    fn = getattr(lib, fn_name)
    _in_slices(lambda lo, hi: fn(src, kind, lo, hi, dst, dtype), count, elements * count)
    return True


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, quant_type: str) -> torch.Tensor | None:
    """``x @ W^T`` with ``W`` the GGUF ``blocks`` (``q8_0``, ``q4_0``, ``q4_1``; uint8
    ``(out_features, row_bytes)``) read packed inside the dot products; None if not handled.

    ``x``: float32 ``(rows, in_features)`` on CPU, ``in_features`` a multiple of 32. The result
    is float32 ``(rows, out_features)``; it equals ``x @ dequantize(W)^T`` up to float32
    rounding of the sums (another summation order than BLAS). Handled only by the compiled
    kernel; where it is off or the tensors do not fit, the caller dequantizes and uses
    ``F.linear`` (the reference).
    """
    lib = _library()
    if lib is None or quant_type not in _GGUF_KINDS:
        return None
    fn_name, kind, size, _ = _GGUF_KINDS[quant_type]
    if fn_name != "loraq_dequant_gguf":  # the packed matmul reads 32-element blocks only
        return None
    if x.dim() != 2 or blocks.dim() != 2:
        return None
    rows, in_features = x.shape
    out_features = blocks.shape[0]
    fits = (
        type(x) is torch.Tensor  # not a FakeTensor or another subclass without real memory
        and type(blocks) is torch.Tensor
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and not x.requires_grad
        and blocks.device.type == "cpu"
        and blocks.dtype == torch.uint8
        and blocks.is_contiguous()
        and in_features % 32 == 0
        and blocks.shape[1] == in_features // 32 * size
    )
    if not fits:
        return None
    y = torch.empty(rows, out_features, dtype=torch.float32)
    if rows and out_features:
        lib.loraq_gguf_matmul(
            blocks.data_ptr(), kind, out_features, in_features, x.data_ptr(), rows, y.data_ptr()
        )
    return y


def packed_matmul(quant_type: str) -> tuple[int, int] | None:
    """``(address, kind)`` of the compiled packed matmul behind :func:`gguf_matmul` for
    ``quant_type``, for compiled code that calls it directly (:mod:`loraq.native.lean_layer`);
    None where :func:`gguf_matmul` would not handle the type or the kernel is unavailable.
    The C signature: ``void (const uint8_t* blocks, int kind, int64_t out_features,
    int64_t in_features, const float* x, int64_t rows, float* y)``."""
    lib = _library()
    if lib is None or quant_type not in _GGUF_KINDS:
        return None
    fn_name, kind, _, _ = _GGUF_KINDS[quant_type]
    if fn_name != "loraq_dequant_gguf":
        return None
    return ctypes.cast(lib.loraq_gguf_matmul, ctypes.c_void_p).value, kind
