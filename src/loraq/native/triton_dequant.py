"""Triton kernels for blockwise dequantization on GPUs (NF4/FP4 packed nibbles and 8-bit codes).

One program writes ``_BLOCK`` consecutive output elements: it loads their bytes, picks the
nibble (the even element sits in the high one), looks the value up in the code book, multiplies
by the block's float32 absmax and rounds once to the output dtype (round-to-nearest-even), the
same arithmetic as :mod:`loraq.quant.blockwise`, so the result is bit-identical (tests check it
on CPU under ``TRITON_INTERPRET=1``).

Triton is optional (``pip install triton``, Linux): without it :func:`available` is False and
callers keep the PyTorch path. On CUDA tensors :func:`dequantize_4bit_into` is used by
``loraq.quant.dequantize_4bit`` automatically.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["available", "dequantize_4bit_into", "dequantize_8bit_into"]

_BLOCK = 1024  # output elements per program
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    # triton.jit decides between compiling and interpreting when it decorates, so the kernels
    # are built once per mode.
    return _build_kernels(_interpreting())


@functools.cache
def _build_kernels(interpret: bool):
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequant4(
        packed_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize,
        BLOCK: tl.constexpr, BF16_BITS: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
        product = value * scale
        if BF16_BITS:
            # round to nearest even in integers: exact on every backend (the interpreter's own
            # float32 -> bfloat16 cast truncates)
            bits = product.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, product.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dequant8(
        codes_ptr, absmax_ptr, code_ptr, out_ptr, n, blocksize,
        BLOCK: tl.constexpr, BF16_BITS: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        index = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        value = tl.load(code_ptr + index, mask=mask, other=0.0)
        scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
        product = value * scale
        if BF16_BITS:
            # round to nearest even in integers: exact on every backend (the interpreter's own
            # float32 -> bfloat16 cast truncates)
            bits = product.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + offs, product.to(out_ptr.dtype.element_ty), mask=mask)

    return dequant4, dequant8


def available() -> bool:
    """Whether Triton is importable (a GPU, or ``TRITON_INTERPRET=1`` for CPU tensors, is
    still needed to run the kernels)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _runnable(tensors: list[torch.Tensor]) -> bool:
    on_gpu = all(t.device.type == "cuda" for t in tensors)
    interpreted = _interpreting() and all(t.device.type == "cpu" for t in tensors)
    return on_gpu or interpreted


def _launch(which: int, codes, absmax, code, blocksize: int, n: int, out: torch.Tensor) -> bool:
    # Check the devices first: importing Triton maps ~70 MB of shared library, which a CPU
    # process should never pay for.
    if not _runnable([codes, absmax, code, out]) or out.dtype not in _OUT_DTYPES:
        return False
    kernels = _kernels()
    if kernels is None:
        return False
    if not out.is_contiguous() or out.numel() < n or absmax.dtype != torch.float32:
        return False
    codes = codes.reshape(-1).contiguous()
    grid = (triton_cdiv(n, _BLOCK),)
    bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.int16) if bf16 else out
    kernels[which][grid](
        codes, absmax.contiguous(), code.float().contiguous(), target, n, blocksize,
        BLOCK=_BLOCK, BF16_BITS=bf16,
    )  # fmt: skip
    return True


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (what ``triton.cdiv`` computes), for the launch grid."""
    return -(-a // b)


def dequantize_4bit_into(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor,
) -> bool:
    """Write flat elements ``[0, n)`` of a packed 4-bit tensor into ``out`` (float32, bfloat16
    or float16); False, writing nothing, when Triton or a GPU is missing or ``out`` does not fit.
    """
    return _launch(0, packed, absmax, code, blocksize, n, out)


def dequantize_8bit_into(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor,
) -> bool:
    """8-bit counterpart of :func:`dequantize_4bit_into` (one code per byte, 256-entry book)."""
    return _launch(1, codes, absmax, code, blocksize, n, out)
