"""GGUF (llama.cpp) block formats: pure quantize / dequantize math on uint8 blocks.

A GGUF tensor of shape ``(rows, cols)`` is stored row by row; each row is cut into blocks of
``block_size`` elements along ``cols`` and each block is ``type_size`` bytes:

============  ==========  =========  ==============================================================
format        block_size  type_size  one block, in byte order
============  ==========  =========  ==============================================================
``q8_0``      32          34         d f16, 32 x int8 q;                 x = q * d
``q4_0``      32          18         d f16, 16 bytes: q[j] low nibble, q[j+16] high; x = (q-8) * d
``q4_1``      32          20         d f16, m f16, 16 bytes as q4_0;     x = q * d + m
``q5_0``      32          22         d f16, 4 bytes fifth bits (bit j: element j), 16 bytes as
                                     q4_0;                               x = (q-16) * d
``q5_1``      32          24         d f16, m f16, then as q5_0;         x = q * d + m
``q4_k``      256         144        d, dmin f16, 12 bytes of 6-bit scales/mins, 128 bytes nibbles
``q5_k``      256         176        as q4_k plus 32 bytes of fifth bits
``q6_k``      256         210        128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, d
============  ==========  =========  ==============================================================

Every operation is the float32 arithmetic of ``gguf.quants`` (llama.cpp's own Python package) in
the same order, so :func:`quantize_gguf` returns its bytes and :func:`dequantize_gguf` its values
bit for bit (on CPU the compiled kernel of :mod:`loraq.native.dequant` computes q8_0 / q4_0 /
q4_1 in one pass, with the same values). The k-quants' quantizers live in :mod:`.kquants`
(``gguf.quants`` has none): they write llama.cpp's reference bytes. ``q5_0`` / ``q5_1`` are
what llama.cpp falls back to when a row does not fit a ``q4_k`` / ``q5_k`` super-block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..native import dequant as cpu_kernels
from ..native.pages import empty_for_write
from .kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

__all__ = [
    "GGUF_QUANT_TYPES",
    "GGUF_TRAINABLE_TYPES",
    "block_size",
    "dequantize_gguf",
    "dequantize_gguf_into",
    "gguf_bytes_shape",
    "quantize_gguf",
    "type_size",
]

# Dequantize this many blocks at a time when the output is not float32 (bounds the temporary).
_CHUNK_BLOCKS = 1 << 15


def _check_type(quant_type: str, writable: bool = False) -> None:
    allowed = GGUF_TRAINABLE_TYPES if writable else GGUF_QUANT_TYPES
    if quant_type not in allowed:
        raise ValueError(f"unsupported GGUF block format {quant_type!r}; expected one of {allowed}")


def block_size(quant_type: str) -> int:
    """Elements per block of ``quant_type``."""
    _check_type(quant_type)
    return _BLOCKS[quant_type].block_size


def type_size(quant_type: str) -> int:
    """Bytes per block of ``quant_type``."""
    _check_type(quant_type)
    return _BLOCKS[quant_type].type_size


def gguf_bytes_shape(shape: tuple[int, ...] | torch.Size, quant_type: str) -> tuple[int, ...]:
    """Shape of the uint8 block array for a tensor of ``shape``: the last dim becomes bytes."""
    _check_type(quant_type)
    bs, ts = _BLOCKS[quant_type].block_size, _BLOCKS[quant_type].type_size
    shape = tuple(shape)
    if not shape or shape[-1] % bs:
        raise ValueError(
            f"{quant_type} needs the last dimension to be a multiple of {bs}, got shape {shape}"
        )
    return (*shape[:-1], shape[-1] // bs * ts)


# ------------------------------------------------------------------------------------------------
# quantize (q8_0, q4_0, q4_1)
# ------------------------------------------------------------------------------------------------
def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (n, 1) -> its float16 bytes (n, 2), little-endian as the file stores them."""
    return x.to(torch.float16).view(torch.uint8)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes 0..15 -> (n, 16) bytes: element j in the low nibble, j+16 in the high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # gguf's np_roundf: floor(|x|) + floor(2 * frac), with the sign put back.
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _reciprocal(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    # The signed value of largest magnitude maps to -8, so its sign uses the full code range.
    signed_max = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = signed_max / -8
    q = torch.trunc(x * _reciprocal(d) + 8.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_halves(q)], dim=1)


def _quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - lo) / 15
    q = torch.trunc((x - lo) * _reciprocal(d) + 0.5).clamp_(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_halves(q)], dim=1)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes 0..31 -> (n, 4) bytes: bit j of the little-endian uint32 is q[j]'s bit 4."""
    bits = ((q >> 4) & 1).view(-1, 4, 8) << torch.arange(8, dtype=torch.uint8, device=q.device)
    return bits.sum(dim=2, dtype=torch.uint8)


def _quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    signed_max = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = signed_max / -16
    q = torch.trunc(x * _reciprocal(d) + 16.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _fifth_bits(q), _pack_halves(q & 15)], dim=1)


def _quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - lo) / 31
    q = torch.trunc((x - lo) * _reciprocal(d) + 0.5).clamp_(0, 31).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _pack_halves(q & 15)], dim=1)


@torch.no_grad()
def quantize_gguf(tensor: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Quantize ``tensor`` into GGUF blocks of ``quant_type`` (any of :data:`GGUF_TRAINABLE_TYPES`).

    The tensor is read as float32; its last dimension must be a multiple of the block size (32,
    or 256 for the k-quants). Returns uint8 of shape :func:`gguf_bytes_shape` whose bytes equal
    ``gguf.quants.quantize(tensor.float().numpy(), GGMLQuantizationType.<TYPE>)`` for the
    32-blocks and llama.cpp's reference quantizer (no importance matrix) for the k-quants.
    """
    _check_type(quant_type, writable=True)
    if not tensor.is_floating_point():
        raise ValueError(f"quantize_gguf needs a floating-point tensor, got {tensor.dtype}")
    out_shape = gguf_bytes_shape(tensor.shape, quant_type)
    block = _BLOCKS[quant_type]
    x = tensor.detach().to(torch.float32).reshape(-1, block.block_size)
    return block.quantize(x).reshape(out_shape)


# ------------------------------------------------------------------------------------------------
# dequantize: each writes (n_blocks, block_size) float32 values into ``out``
# ------------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 (n, 1)."""
    return b[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _unpack_halves(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> ``out`` (n, 32) float32: low nibbles first, then high nibbles."""
    out[:, :16] = qs & 15
    out[:, 16:] = qs >> 4
    return out


def _dequant_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))
    out.mul_(_f16(b, 0))


def _dequant_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_halves(b[:, 2:], out).sub_(8).mul_(_f16(b, 0))


def _dequant_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_halves(b[:, 4:], out).mul_(_f16(b, 0)).add_(_f16(b, 2))


def _unpack_fifth(qh: torch.Tensor, out: torch.Tensor) -> None:
    """Add bit 4 from the (n, 4) fifth-bit bytes to the nibbles already in ``out`` (n, 32)."""
    bits = (qh.reshape(-1, 4, 1) >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1
    out.add_(bits.reshape(-1, 32).to(out.dtype) * 16)


def _dequant_q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_halves(b[:, 6:], out)
    _unpack_fifth(b[:, 2:6], out)
    out.sub_(16).mul_(_f16(b, 0))


def _dequant_q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    _unpack_halves(b[:, 8:], out)
    _unpack_fifth(b[:, 4:8], out)
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (q4_k / q5_k), as float32 (n, 8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _nibble_groups(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32) codes: each 32-byte group gives its low then high nibbles."""
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    g = qs.reshape(-1, 4, 1, 32) >> shifts
    return (g & 15).reshape(-1, 8, 32)


def _dequant_k(b: torch.Tensor, out: torch.Tensor, fifth_bits: bool) -> None:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    if fifth_bits:
        qh = b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(
            8, dtype=torch.uint8, device=b.device
        ).view(1, 1, 8, 1)
        q = _nibble_groups(b[:, 48:]) | ((qh & 1).reshape(n, 8, 32) << 4)
    else:
        q = _nibble_groups(b[:, 16:])
    out.view(n, 8, 32).copy_(q).mul_(d).sub_(dm)


def _dequant_q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    _dequant_k(b, out, fifth_bits=False)


def _dequant_q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    _dequant_k(b, out, fifth_bits=True)


def _dequant_q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64) >> torch.tensor(
        [0, 4], dtype=torch.uint8, device=b.device
    ).view(1, 1, 2, 1)
    ql = (ql & 15).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor(
        [0, 2, 4, 6], dtype=torch.uint8, device=b.device
    ).view(1, 1, 4, 1)
    qh = (qh & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * scales).view(n, 16, 1)
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).mul_(d)


def _as_blocks(blocks: torch.Tensor, quant_type: str, n_blocks: int, where: str) -> torch.Tensor:
    if blocks.dtype != torch.uint8:
        raise ValueError(f"{where}: GGUF blocks must be uint8, got {blocks.dtype}")
    ts = _BLOCKS[quant_type].type_size
    if blocks.numel() != n_blocks * ts:
        raise ValueError(
            f"{where}: {quant_type} needs {n_blocks * ts} bytes ({n_blocks} blocks of {ts}), "
            f"got {blocks.numel()}"
        )
    return blocks.reshape(n_blocks, ts)


def dequantize_gguf_into(
    blocks: torch.Tensor, quant_type: str, out: torch.Tensor, first_block: int = 0
) -> torch.Tensor:
    """Dequantize blocks ``first_block ..`` of ``blocks`` into the flat tensor ``out``.

    ``out.numel()`` must be a whole number of blocks; values are computed in float32 (as
    ``gguf.quants``) and rounded once to ``out.dtype``. Returns ``out``.
    """
    _check_type(quant_type)
    block = _BLOCKS[quant_type]
    bs, ts = block.block_size, block.type_size
    if out.numel() % bs:
        raise ValueError(f"{quant_type}: output size {out.numel()} is not a multiple of {bs}")
    flat = blocks.reshape(-1, ts)
    count = out.numel() // bs
    if cpu_kernels.dequantize_gguf_into(flat, quant_type, first_block, count, out):
        return out  # the compiled kernel: the same values in one pass
    fn = block.dequantize
    if out.dtype == torch.float32 and out.is_contiguous():
        fn(flat[first_block : first_block + count], out.view(count, bs))
        return out
    out2 = out.view(count, bs)
    for start in range(0, count, _CHUNK_BLOCKS):
        stop = min(count, start + _CHUNK_BLOCKS)
        tmp = torch.empty(stop - start, bs, dtype=torch.float32, device=out.device)
        fn(flat[first_block + start : first_block + stop], tmp)
        out2[start:stop].copy_(tmp)
    return out


def dequantize_gguf(
    blocks: torch.Tensor,
    quant_type: str,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense tensor of ``shape`` from GGUF ``blocks`` (uint8, any shape holding the bytes).

    In float32 the values equal ``gguf.quants.dequantize(blocks.numpy(), <TYPE>)`` bit for bit;
    other dtypes are that result rounded once.
    """
    _check_type(quant_type)
    shape = torch.Size(shape)
    gguf_bytes_shape(shape, quant_type)  # validates the last dimension
    n_blocks = math.prod(shape) // _BLOCKS[quant_type].block_size
    flat = _as_blocks(blocks, quant_type, n_blocks, "dequantize_gguf")
    out = empty_for_write(math.prod(shape), dtype, blocks.device)
    return dequantize_gguf_into(flat, quant_type, out).view(shape)


# ------------------------------------------------------------------------------------------------
# the block formats
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BlockMath:
    """One block format's geometry (ggml's ``GGML_QUANT_SIZES``) and its functions."""

    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize: Callable[[torch.Tensor, torch.Tensor], None]
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: read-only


_BLOCKS: dict[str, _BlockMath] = {
    "q8_0": _BlockMath(32, 34, _dequant_q8_0, _quantize_q8_0),
    "q4_0": _BlockMath(32, 18, _dequant_q4_0, _quantize_q4_0),
    "q4_1": _BlockMath(32, 20, _dequant_q4_1, _quantize_q4_1),
    "q5_0": _BlockMath(32, 22, _dequant_q5_0, _quantize_q5_0),
    "q5_1": _BlockMath(32, 24, _dequant_q5_1, _quantize_q5_1),
    "q4_k": _BlockMath(256, 144, _dequant_q4_k, quantize_q4_k),
    "q5_k": _BlockMath(256, 176, _dequant_q5_k, quantize_q5_k),
    "q6_k": _BlockMath(256, 210, _dequant_q6_k, quantize_q6_k),
}
#: Block formats this module dequantizes (what each is for: :mod:`loraq.quant.formats`).
GGUF_QUANT_TYPES: tuple[str, ...] = tuple(_BLOCKS)
#: Block formats it also quantizes (all of them).
GGUF_TRAINABLE_TYPES: tuple[str, ...] = tuple(n for n, b in _BLOCKS.items() if b.quantize)
