"""Quantizers for llama.cpp's k-quants (``q4_k``, ``q5_k``, ``q6_k``), vectorised over blocks.

A k-quant super-block holds 256 values in sub-blocks with their own scales, and the scales are
themselves quantized against one float16 per super-block:

=======  ==========  ==========================================================================
format   sub-blocks  how a sub-block is fitted (llama.cpp's reference, no importance matrix)
=======  ==========  ==========================================================================
q4_k     8 x 32      ``x = d*sc*q - dmin*m``, q in 0..15: an affine fit searched over 21 trial
                     scales, weighted by ``rms(x) + |x|``; sc, m 6-bit codes of d, dmin
q5_k     8 x 32      the same with q in 0..31 and 16 trial scales
q6_k     16 x 16     ``x = d*sc*q``, q in -32..31: a symmetric fit weighted by ``x**2``, tried
                     at 19 scales; sc an int8 code of d
=======  ==========  ==========================================================================

The goal is **llama.cpp's bytes** (``quantize_row_q4_K_ref`` and friends, what
``llama-quantize`` writes when no importance matrix is given), so every float32 operation
happens in llama.cpp's order: sums over a sub-block accumulate element by element (a tree sum
rounds differently), rounding is its "add 1.5 * 2**23" trick (ties to even), and ties between
candidates are broken as its strict comparisons break them. The search runs for all blocks at
once; only the accumulations step over the 32 (or 16) elements of a sub-block.
"""

from __future__ import annotations

import torch

from ..native import kquant as kernel

__all__ = ["quantize_kquant", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

#: Elements of a k-quant super-block (ggml's ``QK_K``).
QK_K = 256
# llama.cpp treats a sub-block whose largest magnitude is below this as all zeros.
_GROUP_MAX_EPS = 1e-15
# Sub-blocks handled at a time: bounds the temporaries (a few (32, n) float32 tensors).
_CHUNK_SUBBLOCKS = 1 << 15
_F32 = torch.float32


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int``: add 1.5 * 2**23 and read the mantissa (ties to even)."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one row after another, as a C loop accumulates (float32, in order)."""
    acc = t[0].clone()
    for row in t[1:]:
        acc.add_(row)
    return acc


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C's ``sqrtf``): torch's vectorised float32 sqrt
    may land one ulp off, while a float64 root rounded once to float32 never does."""
    return torch.sqrt(x.to(torch.float64)).to(_F32)


def _f16_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 -> float32 (what a block's stored scale reads back as)."""
    return x.to(torch.float16).to(_F32)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> (n, 2) little-endian float16 bytes."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _chunked(fn, x: torch.Tensor, sub: int) -> torch.Tensor:
    """Apply ``fn`` to (n_blocks, 256) float32 in chunks of whole super-blocks."""
    step = max(1, _CHUNK_SUBBLOCKS // sub)
    parts = [fn(x[i : i + step]) for i in range(0, x.shape[0], step)]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


# ------------------------------------------------------------------------------ q4_k / q5_k
def _affine_search(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qkx2_quants`` for every sub-block (squared error, no MAD).

    ``x``, ``w``: (32, n) values and weights, one sub-block per column. Returns (codes (32, n)
    float32, scale (n,), min (n,)): ``x ~ scale * code - min``.
    """
    lo = x.amin(dim=0).clamp(max=0.0)  # the offset never moves above zero
    hi = x.amax(dim=0)
    flat = hi == lo
    span = hi - lo
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)

    def codes(iscale: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return _nearest_int(iscale * (x - base)).clamp_(0, nmax).to(_F32)

    def error(scale: torch.Tensor, base: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale * q + base - x
        return _seq_sum(w * (diff * diff))

    safe_span = torch.where(flat, torch.ones_like(span), span)
    iscale = nmax / safe_span
    scale = 1 / iscale
    q = codes(iscale, lo)
    best = error(scale, lo, q)
    for step in range(nstep + 1 if nstep >= 1 else 0):
        # (rmin + rdelta * is + nmax) in float32, as C evaluates it
        trial = torch.tensor(rmin, dtype=_F32) + torch.tensor(rdelta, dtype=_F32) * step + nmax
        iscale = trial / torch.where(flat, torch.ones_like(span), hi - lo)
        qa = codes(iscale, lo)
        wl = w * qa
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * qa), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, qa)
        better = ok & (cur < best) & ~flat
        best = torch.where(better, cur, best)
        q = torch.where(better, qa, q)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    q = torch.where(flat, torch.zeros_like(q), q)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return q, scale, -lo


def _pack_scale_min(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scale and min codes -> (n, 12) bytes in ggml's k4 layout."""
    out = torch.empty(ls.shape[0], 12, dtype=torch.uint8, device=ls.device)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _quantize_affine_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> torch.Tensor:
    """q4_k / q5_k super-blocks: (n, 256) float32 -> (codes (n, 256) uint8, header (n, 16))."""
    n = x.shape[0]
    xs = x.reshape(n * 8, 32).t().contiguous()  # (32, sub-blocks)
    av_x = _sqrt(_seq_sum(xs * xs) / 32)
    w = av_x + xs.abs()
    q, scales, mins = _affine_search(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    # Running maxima that start at +0 (a -0 min of an all-positive block must not leak in).
    max_scale = scales.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)
    max_min = mins.amax(dim=1)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / max_min, torch.zeros_like(max_min))
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63).to(torch.uint8)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63).to(torch.uint8)
    d = max_scale / 63.0
    dmin = max_min / 63.0
    # Re-fit every code against the scales as they will be read back.
    sub_d = (_f16_round(d)[:, None] * ls.to(_F32)).reshape(-1)  # (sub-blocks,)
    sub_m = (_f16_round(dmin)[:, None] * lm.to(_F32)).reshape(-1)
    live = sub_d != 0
    refit = _nearest_int((xs + sub_m) / torch.where(live, sub_d, 1.0)).clamp_(0, nmax).to(_F32)
    q = torch.where(live, refit, q)
    codes = q.t().reshape(n, 256).to(torch.uint8)
    header = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min(ls, lm)], dim=1)
    return codes, header


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    codes, header = _quantize_affine_k(x, 15, -1.0, 20)
    g = codes.view(-1, 4, 2, 32)  # 64-value groups: first 32 low nibbles, next 32 high
    qs = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([header, qs], dim=1)


def _q5_k_blocks(x: torch.Tensor) -> torch.Tensor:
    codes, header = _quantize_affine_k(x, 31, -0.5, 15)
    g = codes.view(-1, 4, 2, 32)
    low = g & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    # fifth bits: byte j, bit 2c (+1) holds element j (+32) of 64-value group c
    shifts = torch.arange(8, dtype=torch.uint8, device=x.device).view(1, 4, 2, 1)
    qh = ((g >> 4) << shifts).reshape(-1, 8, 32).sum(dim=1, dtype=torch.uint8)
    return torch.cat([header, qh, qs], dim=1)


# ------------------------------------------------------------------------------------- q6_k
def _symmetric_search(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qx_quants`` with ``rmse_type = 1`` (weights ``x**2``), per column.

    ``x``: (16, n). Returns (codes (16, n) float32 in 0..2*nmax-1, scale (n,)).
    """
    first_amax = x.abs().argmax(dim=0, keepdim=True)  # the first largest, as a strict > keeps
    peak = x.gather(0, first_amax)[0]
    zero = x.abs().amax(dim=0) < _GROUP_MAX_EPS
    safe_peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lv = _nearest_int(iscale * x).clamp_(-nmax, nmax - 1).to(_F32)
        wl = w * lv
        return lv, _seq_sum((w * x) * lv), _seq_sum(wl * lv)

    lv, sumlx, suml2 = trial(torch.tensor(-nmax, dtype=_F32) / safe_peak)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        factor = -(nmax + torch.tensor(0.1, dtype=_F32) * step)
        lt, sumlx, suml2 = trial(factor / safe_peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        lv = torch.where(better, lt, lv)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, lv + nmax), torch.where(zero, 0.0, scale)


def _q6_k_blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    xs = x.reshape(n * 16, 16).t().contiguous()  # (16, sub-blocks)
    q, scales = _symmetric_search(xs, 32)
    scales = scales.view(n, 16)
    first = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = scales.gather(1, first)[:, 0]
    empty = max_scale.abs() < _GROUP_MAX_EPS
    iscale = -128.0 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = 1 / iscale
    sc = _nearest_int(iscale[:, None] * scales).clamp_(max=127)
    sc_bytes = (sc & 0xFF).to(torch.uint8)
    sub_d = (_f16_round(d)[:, None] * sc_bytes.view(torch.int8).to(_F32)).reshape(-1)
    live = sub_d != 0
    refit = _nearest_int(xs / torch.where(live, sub_d, 1.0)).clamp_(-32, 31).to(_F32) + 32
    q = torch.where(live, refit, q)
    codes = q.t().reshape(n, 2, 4, 32).to(torch.uint8)  # halves of 128, quarters of 32
    low = codes & 15
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=x.device).view(1, 1, 4, 1)
    qh = ((codes >> 4) << shifts).sum(dim=2, dtype=torch.uint8)  # (n, 2, 32)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc_bytes, _f16_bytes(d)], dim=1)
    out[empty] = 0
    return out


_PYTORCH = {"q4_k": (_q4_k_blocks, 8), "q5_k": (_q5_k_blocks, 8), "q6_k": (_q6_k_blocks, 16)}


def quantize_kquant(x: torch.Tensor, quant_type: str, compiled: bool = True) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, type size) bytes of ``quant_type``, as llama.cpp's
    reference quantizer writes them; ``compiled=False`` forces the PyTorch path (the kernel of
    :mod:`loraq.native.kquant` writes the same bytes, faster)."""
    x = x.contiguous()
    out = torch.empty(
        x.shape[0], kernel.KERNEL_TYPES[quant_type], dtype=torch.uint8, device=x.device
    )
    if compiled and kernel.quantize_kquant_into(x, quant_type, out):
        return out
    fn, sub = _PYTORCH[quant_type]
    return _chunked(fn, x, sub)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, 144) q4_k bytes (:func:`quantize_kquant`)."""
    return quantize_kquant(x, "q4_k")


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, 176) q5_k bytes (:func:`quantize_kquant`)."""
    return quantize_kquant(x, "q5_k")


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """(n, 256) float32 super-blocks -> (n, 210) q6_k bytes (:func:`quantize_kquant`)."""
    return quantize_kquant(x, "q6_k")
