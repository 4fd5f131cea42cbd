"""Blockwise 4-bit (NF4/FP4) and 8-bit (dynamic map) quantization math, byte-compatible with bitsandbytes.

Pure functions on plain tensors; the records that hold their results (and build themselves with
them, e.g. :meth:`loraq.quant.QuantizedTensor.from_tensor`) live in :mod:`.qtensor`, which
imports this module (never the other way round). The rules (``docs/formats.md``):

* Flatten row-major; block ``b`` is flat elements ``[b*B, (b+1)*B)``, so blocks ignore rows. A
  partial last block gets its own absmax.
* ``absmax`` is the float32 max of ``|x|`` per block, whatever the input dtype.
* Scale with the reciprocal, ``s = x * (1 / absmax)`` (absmax clamped to 1e-38 first, so an
  all-zero block scales to 0 and gets the code of 0).
* The code is the bucket of ``s`` between decision bounds of the sorted table; a value exactly on
  a bound goes to the LOWER entry. 4-bit uses bitsandbytes' float32 midpoints ``(a + b) / 2``;
  8-bit uses midpoints rounded down to float32, which makes every code exactly nearest.
* 4-bit codes are packed two per byte, the even flat index in the HIGH nibble; an odd count is
  padded with the code of 0.0. ``packed`` has shape ``((n + 1) // 2, 1)``, dtype uint8.
* Dequantization is ``code[q] * absmax[i // B]`` in float32, cast once to the target dtype.
* Double quantization: ``offset = absmax.mean()``; ``absmax - offset`` is 8-bit quantized with
  the dynamic map in blocks of 256; ``absmax_hat = code8[q] * nested_absmax + offset`` (two
  float32 roundings, no fused multiply-add).

Performance notes. The work is done in cache-sized chunks of whole blocks with scratch buffers
allocated once per call: fresh multi-megabyte temporaries cost more in page faults than the
arithmetic. Nearest-code search uses a uniform grid over [-1, 1] whose cells map straight to a
code; the few cells within one cell of a decision bound are marked ambiguous and only those
elements go through an exact ``bucketize`` (see :class:`_CodeSearch`). Dequantization gathers
both nibbles of a byte at once from a 256-entry table of float32 pairs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core.dtypes import FLOAT_DTYPE_NAMES, FLOAT_DTYPES
from ..native import dequant as cpu_kernels
from ..native import triton_dequant as gpu_kernels
from .codebooks import VALID_BLOCKSIZES, code_4bit, dynamic_map

__all__ = [
    "check_quantizable",
    "dequantize_4bit_blocks",
    "dequantize_8bit_blocks",
    "pack_nibbles",
    "quantize_4bit_blocks",
    "quantize_8bit_blocks",
    "resolve_dtype",
    "unpack_nibbles",
]

# Elements per chunk (4 MiB of float32): big enough that the ~10 parallel regions per chunk stay
# few (each costs a thread hand-off, dear when cores are few or busy), small enough that a chunk
# and its temporaries stay in the last-level cache and scratch buffers stay small.
_CHUNK = 1 << 20
# Grid cells per unit of the scaled range [-1, 1]; the grid table has 2 * _GRID + 1 cells.
_GRID = 1 << 15
# Smallest absmax used for the reciprocal, as bitsandbytes (its reciprocal is still finite).
_MIN_ABSMAX = 1e-38
# Blocks with a smaller absmax skip the grid: _GRID / absmax could overflow float32.
_TINY_ABSMAX = 1e-30
# Width of the sub-blocks scanned for ambiguous codes (an int16 amin over 64 is much cheaper than
# over 32; wider makes the second, per-element scan longer).
_SUB = 64


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_quantizable(t: torch.Tensor, blocksize: int) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor) unless ``t`` can be quantized."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES.values():
        raise ValueError(
            f"cannot quantize a tensor of dtype {t.dtype}: expected one of {list(FLOAT_DTYPE_NAMES)}"
        )
    if t.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(t.shape)})")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}: expected one of {VALID_BLOCKSIZES}")


def _check_finite(absmax: torch.Tensor) -> None:
    # NaN and Inf propagate into the block absmax, so checking it is free compared with a
    # separate pass over the input (and must happen before NaN reaches an index conversion).
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("cannot quantize a tensor with NaN or Inf values")


def resolve_dtype(dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """``dtype`` (or ``default`` when None), refusing a non-floating-point one."""
    dtype = default if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dequantization needs a floating-point dtype, got {dtype}")
    return dtype


# --------------------------------------------------------------------------------------------
# Nearest-code search
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CodeSearch:
    """How to find the code of a scaled value ``s`` in [-1, 1] for one code book.

    ``bounds`` are the sorted decision bounds (a value equal to a bound goes to the lower
    entry), ``order`` maps a sorted position to a code index (None when the table is sorted).
    ``grid[c]`` is the code of every ``s`` whose cell ``floor((s + 1) * _GRID)`` is ``c``, or -1
    when a bound lies in cell ``c`` or in a neighbouring cell. Computing the cell in float32 can
    be off by one near a cell edge, so a cell marked unambiguous is one whose neighbours hold no
    bound either: the code it stores is then right for any value that can land in it.
    """

    bounds: torch.Tensor
    order: torch.Tensor | None
    grid: torch.Tensor
    zero_code: int  # the code of 0.0, which pads an odd count of 4-bit codes

    @staticmethod
    def build(bounds: torch.Tensor, order: torch.Tensor | None) -> _CodeSearch:
        """Precompute the grid for ``bounds`` (sorted float32) and ``order`` (see class doc)."""
        lower = torch.arange(2 * _GRID + 1, dtype=torch.float64) / _GRID - 1  # cell lower edges
        width = 1.0 / _GRID
        b = bounds.double()
        # A cell [lower, lower + w) is ambiguous if a bound lies in [lower - w, lower + 2w].
        first = torch.searchsorted(b, lower - width, right=False)
        last = torch.searchsorted(b, lower + 2 * width, right=True)
        position = torch.searchsorted(b, lower)  # number of bounds below the cell
        codes = position if order is None else order[position]
        grid = torch.where(last > first, -1, codes).to(torch.int16)
        zero = int(torch.bucketize(torch.zeros(()), bounds))
        return _CodeSearch(bounds, order, grid, zero if order is None else int(order[zero]))

    def exact(self, s: torch.Tensor) -> torch.Tensor:
        """Code index (int64) of each float32 value by bucketing against ``bounds``."""
        position = torch.bucketize(s, self.bounds.to(s.device))
        return position if self.order is None else self.order.to(s.device)[position]


@functools.cache
def _search_4bit(quant_type: str) -> _CodeSearch:
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    # bitsandbytes' bounds: float32 midpoints (identical to the CUDA thresholds). FP4 holds 0.0
    # twice (indices 0 and 8); the stable sort puts index 0 first, as bitsandbytes' CPU path.
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    is_sorted = torch.equal(order, torch.arange(code.numel()))
    return _CodeSearch.build(bounds, None if is_sorted else order)


@functools.cache
def _search_dynamic() -> _CodeSearch:
    code = dynamic_map()  # sorted ascending
    exact_mid = (code[:-1].double() + code[1:].double()) / 2  # exact in float64
    bounds = exact_mid.float()
    # Round down where float32 rounded up: then "s > bound" holds exactly when s is past the
    # true midpoint, so the chosen code is the exactly nearest one (ties to the lower index).
    too_high = bounds.double() > exact_mid
    bounds[too_high] = torch.nextafter(bounds[too_high], torch.tensor(-math.inf))
    return _CodeSearch.build(bounds, None)


# --------------------------------------------------------------------------------------------
# Blockwise scaling and coding
# --------------------------------------------------------------------------------------------
def _fix_ambiguous(
    codes: torch.Tensor, x: torch.Tensor, recip: torch.Tensor, blocksize: int, search: _CodeSearch
) -> None:
    """Replace the -1 marks of ambiguous grid cells with exact codes, in place.

    About 0.1% of elements are marked. A per-sub-block minimum finds the sub-blocks holding
    marks far faster than a compare-and-nonzero pass over every element.
    """
    sub = math.gcd(codes.numel(), _SUB)  # 64 except in a short last chunk of 32-blocks
    rows = (codes.view(-1, sub).amin(dim=1) < 0).nonzero().squeeze(1)
    if not rows.numel():
        return
    row, col = (codes.view(-1, sub)[rows] < 0).nonzero(as_tuple=True)
    pos = rows[row] * sub + col
    codes[pos] = search.exact(x[pos] * recip[pos // blocksize]).to(torch.int16)


def _iter_block_codes(
    flat: torch.Tensor,
    blocksize: int,
    search: _CodeSearch,
    absmax_out: torch.Tensor,
    *,
    divide_tail: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, codes)`` for consecutive runs of ``flat``, writing each block's absmax.

    ``codes`` is an int16 view into a scratch buffer that is overwritten by the next chunk;
    consumers must copy it out before resuming the iterator. Full blocks come in chunks of
    whole blocks, then the partial last block, if any.

    ``divide_tail`` scales the partial last block by division instead of the reciprocal, which
    is what bitsandbytes' CPU ``quantize_4bit`` does for that block (its CUDA kernel multiplies).
    """
    n = flat.numel()
    n_full = n // blocksize * blocksize
    chunk = max(min(_CHUNK, n_full) // blocksize, 1) * blocksize
    device = flat.device
    grid = search.grid.to(device)
    offset = torch.tensor(float(_GRID), device=device)
    if n_full:
        upcast = torch.empty(chunk, dtype=torch.float32, device=device)
        work = torch.empty(chunk, dtype=torch.float32, device=device)
        index = torch.empty(chunk, dtype=torch.int32, device=device)
        codes = torch.empty(chunk, dtype=torch.int16, device=device)
    for start in range(0, n_full, chunk):
        stop = min(start + chunk, n_full)
        m = stop - start
        x = flat[start:stop]
        if x.dtype != torch.float32:  # exact upcast once, so every pass below is float32
            x = upcast[:m].copy_(x)
        # abs + amax: an order of magnitude faster than aminmax over a short inner dimension.
        amax = torch.abs(x, out=work[:m]).view(-1, blocksize).amax(dim=1)
        _check_finite(amax)
        absmax_out[start // blocksize : stop // blocksize] = amax
        tiny = amax < _TINY_ABSMAX
        recip = amax.clamp_(min=_MIN_ABSMAX).reciprocal_()  # s = x * (1 / absmax), as bnb
        # Grid cell floor((s + 1) * G), computed as x * (G / absmax) + G in one pass. It can
        # differ from the cell of the rounded float32 s by one, which the grid tolerates.
        # Where G / absmax could overflow, the scale is 0 (cell G) and exact codes follow.
        scale = (recip * _GRID).masked_fill_(tiny, 0.0)
        cell = torch.addcmul(
            offset, x.view(-1, blocksize), scale[:, None], out=work[:m].view(-1, blocksize)
        )
        index[:m].copy_(cell.view(-1))  # float -> int truncation is a floor here (cell >= 0)
        c = torch.index_select(grid, 0, index[:m], out=codes[:m])
        _fix_ambiguous(c, x, recip, blocksize, search)
        if bool(tiny.any()):
            blocks = tiny.nonzero().squeeze(1)
            s = x.view(-1, blocksize)[blocks] * recip[blocks, None]
            c.view(-1, blocksize)[blocks] = search.exact(s).to(torch.int16)
        yield start, c
    if n_full < n:
        tail = flat[n_full:].float()
        amax = tail.abs().max()
        _check_finite(amax)
        absmax_out[-1] = amax
        clamped = amax.clamp(min=_MIN_ABSMAX)
        s = tail / clamped if divide_tail else tail * clamped.reciprocal()
        yield n_full, search.exact(s).to(torch.int16)


def _n_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------
def _pack_into(codes: torch.Tensor, out: torch.Tensor) -> None:
    # byte = (even << 4) | odd; codes < 16, so the add never carries into the other nibble.
    torch.add(codes[1::2], codes[0::2], alpha=16, out=out)


def pack_nibbles(codes: torch.Tensor, pad_code: int = 7) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15, any integer dtype) two per byte, bitsandbytes' layout.

    The code of even flat index ``2i`` goes to the high nibble of byte ``i``; an odd count is
    padded with ``pad_code`` (7, NF4's zero, by default). Returns uint8 of shape
    ``((n + 1) // 2, 1)``.
    """
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_tensor([pad_code])])
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=flat.device)
    _pack_into(flat, out)
    return out.unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes of shape ``(n,)`` (default: all nibbles)."""
    flat = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes if n is None else codes[:n]


# --------------------------------------------------------------------------------------------
# Quantize
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_4bit_blocks(
    t: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, absmax)`` of ``t``: bitsandbytes' packed 4-bit codes and float32 block scales.

    ``packed`` is uint8 ``((n + 1) // 2, 1)``; ``absmax`` float32 ``(n_blocks,)``. Raises
    ``ValueError`` for input :func:`check_quantizable` refuses or an unknown ``quant_type``.
    """
    check_quantizable(t, blocksize)
    code_4bit(quant_type)  # refuses a name with no 4-bit code book
    flat = t.detach().reshape(-1)
    n = flat.numel()
    search = _search_4bit(quant_type)
    absmax = torch.empty(_n_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    for start, codes in _iter_block_codes(flat, blocksize, search, absmax, divide_tail=True):
        if codes.numel() % 2:  # only the very last run can be odd
            codes = torch.cat([codes, codes.new_tensor([search.zero_code])])
        _pack_into(codes, packed[start // 2 : start // 2 + codes.numel() // 2])
    return packed.unsqueeze(1), absmax


@torch.no_grad()
def quantize_8bit_blocks(t: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of ``t`` on the dynamic map: uint8 ``(n,)`` codes, exactly nearest
    (ties to the lower index), and float32 ``(n_blocks,)`` block scales. Same errors as
    :func:`quantize_4bit_blocks`."""
    check_quantizable(t, blocksize)
    flat = t.detach().reshape(-1)
    n = flat.numel()
    absmax = torch.empty(_n_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    out = torch.empty(n, dtype=torch.uint8, device=flat.device)
    search = _search_dynamic()
    for start, codes in _iter_block_codes(flat, blocksize, search, absmax, divide_tail=False):
        out[start : start + codes.numel()] = codes
    return out, absmax


# --------------------------------------------------------------------------------------------
# Dequantize
# --------------------------------------------------------------------------------------------
# gather(lo, hi) -> float32 code values of flat elements lo..hi, in a scratch buffer that the
# next call overwrites. The scaling pass that follows writes the output, so the first touch of
# a fresh output's pages happens in a parallel op.
Gather = Callable[[int, int], torch.Tensor]


def _scale_into(
    values: torch.Tensor, absmax: torch.Tensor, blocksize: int, start: int, out: torch.Tensor
) -> None:
    """``out = values * absmax[block]`` for flat positions ``start..``; float32 product, one cast."""
    m = values.numel()
    n_full = m // blocksize * blocksize
    first = start // blocksize
    if n_full:
        v = values[:n_full].view(-1, blocksize)
        scales = absmax[first : first + n_full // blocksize, None]
        if out.dtype == torch.float32:
            torch.mul(v, scales, out=out[:n_full].view(-1, blocksize))
        else:
            # Multiply in place in float32, then one rounding on the copy (a mixed-dtype
            # ``mul(out=bf16)`` takes a slow non-vectorised path on CPU).
            out[:n_full].view(-1, blocksize).copy_(v.mul_(scales))
    if n_full < m:
        out[n_full:].copy_(values[n_full:] * absmax[first + n_full // blocksize])


def _dequantize_runs(
    gather: Gather, absmax: torch.Tensor, blocksize: int, start: int, stop: int, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` (1-D, ``stop - start`` elements) chunk by chunk; ``start`` is block-aligned."""
    chunk = max(_CHUNK // blocksize, 1) * blocksize
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        _scale_into(gather(lo, hi), absmax, blocksize, lo, out[lo - start : hi - start])
    return out


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """256 int64 entries; entry ``b`` holds the float32 pair ``(code[b >> 4], code[b & 15])``."""
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).float().contiguous()
    return pairs.view(torch.int64).view(-1)


def _lookup(
    table: torch.Tensor, codes: torch.Tensor, index: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out[i] = table[codes[i]]`` for uint8 ``codes``, using ``index`` (int64) as scratch.

    ``index_select`` would do, but runs on one thread; ``gather`` over a row-expanded view of
    the table splits the rows across threads.
    """
    n = codes.numel()
    idx = index[:n].copy_(codes)
    rows = math.gcd(n, 64)
    return torch.gather(
        table.expand(rows, -1), 1, idx.view(rows, -1), out=out[:n].view(rows, -1)
    ).view(-1)


def _nibble_gather(packed: torch.Tensor, code: torch.Tensor) -> Gather:
    """Gather for packed nibbles (``lo`` even): one int64 lookup yields both codes of a byte."""
    flat = packed.reshape(-1).view(torch.uint8)
    table = _pair_table(code)
    n_bytes = min(_CHUNK // 2 + 1, flat.numel())
    index = torch.empty(n_bytes, dtype=torch.int64, device=flat.device)
    scratch = torch.empty(n_bytes, dtype=torch.int64, device=flat.device)

    def gather(lo: int, hi: int) -> torch.Tensor:
        pairs = _lookup(table, flat[lo // 2 : (hi + 1) // 2], index, scratch)
        return pairs.view(torch.float32)[: hi - lo]

    return gather


def _byte_gather(codes: torch.Tensor, code: torch.Tensor) -> Gather:
    """Gather for one code per byte: ``code[codes[lo:hi]]``."""
    flat = codes.reshape(-1)
    table = code.float()
    n = min(_CHUNK, flat.numel())
    index = torch.empty(n, dtype=torch.int64, device=flat.device)
    scratch = torch.empty(n, dtype=torch.float32, device=flat.device)
    return lambda lo, hi: _lookup(table, flat[lo:hi], index, scratch)


def _compiled_into(bits: int, *args) -> bool:
    """Run a compiled kernel (C on CPU, Triton on CUDA) if one takes these tensors; see
    :mod:`loraq.native`. False means: use the PyTorch path below."""
    if bits == 4:
        return cpu_kernels.dequantize_4bit_into(*args) or gpu_kernels.dequantize_4bit_into(*args)
    return cpu_kernels.dequantize_8bit_into(*args) or gpu_kernels.dequantize_8bit_into(*args)


def dequantize_4bit_blocks(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    start: int,
    stop: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``code[nibble] * absmax[block]`` of flat elements ``[start, stop)`` into ``out``.

    ``packed`` holds two codes per byte (bitsandbytes' layout), ``absmax`` the float32 block
    scales; ``out`` is 1-D with ``stop - start`` elements, in any float dtype (one rounding from
    float32). ``start`` must be a multiple of ``blocksize``. Writing into a caller's buffer lets
    a layer reuse memory across calls (see ``loraq.layers.quantized``).
    """
    if start % blocksize:
        raise ValueError(f"start {start} is not a multiple of the blocksize {blocksize}")
    if start == 0 and _compiled_into(4, packed, absmax, code, blocksize, stop, out):
        return out
    gather = _nibble_gather(packed, code)
    return _dequantize_runs(gather, absmax, blocksize, start, stop, out)


def dequantize_8bit_blocks(
    codes: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    start: int,
    stop: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """One-code-per-byte counterpart of :func:`dequantize_4bit_blocks` (the 8-bit format and the
    double-quantized block scales of the 4-bit one)."""
    if start % blocksize:
        raise ValueError(f"start {start} is not a multiple of the blocksize {blocksize}")
    if start == 0 and _compiled_into(8, codes, absmax, code, blocksize, stop, out):
        return out
    gather = _byte_gather(codes, code)
    return _dequantize_runs(gather, absmax, blocksize, start, stop, out)
