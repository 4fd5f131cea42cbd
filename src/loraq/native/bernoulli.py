"""Dropout masks drawn exactly as PyTorch's CPU ``Tensor.bernoulli_(p)`` draws them, faster.

Where PyTorch does not hand ``bernoulli_`` to MKL (CPUs not made by Intel), it draws each element
in a serial loop over its Mersenne Twister; for LoRA dropout on every adapted layer that loop
becomes a large share of a training step. The kernel of ``bernoulli.c`` produces the same bits
from the same generator state (and leaves the generator where ``bernoulli_`` would), but
generates and compares the words in vectorized runs. Seeded runs therefore stay identical to
PyTorch's own ``nn.Dropout``, and to PEFT.

Before the kernel is trusted it is checked once per process against ``bernoulli_`` on a private
generator; if this PyTorch draws differently (MKL on Intel, another generator layout), or the
kernel cannot be built, every call uses ``bernoulli_`` itself. Unlike ``bernoulli_`` the kernel
does not lock the generator: another thread drawing from the same generator at the same moment
would interleave with it.

Masks can also live at one bit per element (:func:`keep_mask` draws straight into bits,
:func:`apply_keep` zeroes the dropped elements from them, :func:`pack_mask` /
:func:`unpack_mask` convert), which is how dropout keeps them for backward.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch

from .build import load_library, shares_torch_openmp

__all__ = [
    "apply_keep",
    "bernoulli_mask",
    "dropout",
    "exact_kernel_available",
    "keep_mask",
    "pack_mask",
    "packing_available",
    "unpack_mask",
]

_SOURCE = Path(__file__).with_name("bernoulli.c")
# torch.Generator.get_state() of a CPU generator: the Mersenne Twister layout bernoulli.c reads.
_STATE_BYTES = 5056
# Below this many elements saving and restoring the generator state costs more than it saves.
_KERNEL_MIN = 2048


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "dropout masks", openmp=shares_torch_openmp())
    if lib is not None:
        for fn in (lib.loraq_bernoulli_u8, lib.loraq_bernoulli_bits):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p]
            fn.restype = None
        for fn in (lib.loraq_pack_mask, lib.loraq_unpack_mask):
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p], None
        lib.loraq_keep_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p]
        lib.loraq_keep_f32.restype = None
    return lib


def _threshold(p: float) -> int:
    # bernoulli_ keeps an element when (v & (2^53-1)) * 2^-53 < p, i.e. v & ... < ceil(p * 2^53)
    return math.ceil(p * 2.0**53)


def _kernel_mask(n: int, p: float, generator: torch.Generator, packed: bool = False):
    """``n`` draws as 0/1 bytes, or as ``(n + 7) // 8`` bytes of bits when ``packed``."""
    lib = _library()
    assert lib is not None
    state = generator.get_state()
    out = torch.empty(-(-n // 8) if packed else n, dtype=torch.uint8)
    draw = lib.loraq_bernoulli_bits if packed else lib.loraq_bernoulli_u8
    draw(state.data_ptr(), _threshold(p), n, out.data_ptr())
    generator.set_state(state)
    return out


@functools.cache
def exact_kernel_available() -> bool:
    """Whether the compiled kernel is built and reproduces this PyTorch's ``bernoulli_``.

    Checked once per process on a private generator, across sizes that cross the twister's
    624-word refills and for several probabilities, including where the generator ends up.
    """
    if _library() is None:
        return False
    generator = torch.Generator().manual_seed(0x10AA)
    if generator.get_state().numel() != _STATE_BYTES:
        return False
    for n, p in ((1, 0.95), (311, 0.5), (625, 0.9), (5003, 1 / 3), (4099, 0.95)):
        before = generator.get_state()
        expected = torch.empty(n, dtype=torch.uint8).bernoulli_(p, generator=generator)
        after = generator.get_state()
        generator.set_state(before)
        got = _kernel_mask(n, p, generator)
        if not (torch.equal(got, expected) and torch.equal(generator.get_state(), after)):
            return False
    return True


def _kernel_applies(like: torch.Tensor, p: float) -> bool:
    """A plain contiguous CPU tensor outside tracing (fake, batched and other wrapped tensors
    keep PyTorch's own draw), and a kernel that reproduces it."""
    return (
        type(like) is torch.Tensor
        and like.device.type == "cpu"
        and like.is_contiguous()
        and like.numel() >= _KERNEL_MIN
        and 0.0 <= p <= 1.0
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(like)
        and exact_kernel_available()
    )


def bernoulli_mask(
    like: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uint8 tensor of 0/1 with ``like``'s shape and device, each 1 with probability ``p``.

    The same values as ``torch.empty(like.shape, dtype=torch.uint8,
    device=like.device).bernoulli_(p, generator=generator)``, and the generator advances the same
    way; on CPU, when :func:`exact_kernel_available`, they are drawn by the compiled kernel.
    """
    source = torch.default_generator if generator is None else generator
    if source.device.type == "cpu" and _kernel_applies(like, p):
        return _kernel_mask(like.numel(), p, source).view(like.shape)
    return torch.empty(like.shape, dtype=torch.uint8, device=like.device).bernoulli_(
        p, generator=generator
    )


@functools.cache
def packing_available() -> bool:
    """Whether masks can be kept at one bit per element (the kernel is built and its packing
    round-trips here, checked once per process against a PyTorch packing)."""
    if _library() is None:
        return False
    mask = (torch.arange(1237) * 7919 % 5 < 3).to(torch.uint8)
    bits = _pack(mask)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    padded = torch.cat([mask, mask.new_zeros(-mask.numel() % 8)]).view(-1, 8)
    expected = (padded * weights).sum(1, dtype=torch.uint8)
    return torch.equal(bits, expected) and torch.equal(unpack_mask(bits, mask.shape), mask)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    bits = torch.empty(-(-mask.numel() // 8), dtype=torch.uint8)
    _library().loraq_pack_mask(mask.data_ptr(), mask.numel(), bits.data_ptr())
    return bits


def pack_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """A contiguous CPU 0/1 uint8 ``mask`` at one bit per element (bit ``i % 8`` of byte
    ``i // 8``), or None when it cannot be packed here (then keep ``mask`` itself)."""
    if not (
        type(mask) is torch.Tensor
        and mask.device.type == "cpu"
        and mask.dtype == torch.uint8
        and mask.is_contiguous()
        and packing_available()
    ):
        return None
    return _pack(mask)


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The uint8 mask of ``shape`` that :func:`pack_mask` packed into ``bits``."""
    mask = torch.empty(shape, dtype=torch.uint8)
    if bits.numel() != -(-mask.numel() // 8):
        raise ValueError(f"{bits.numel()} packed bytes cannot hold a mask of shape {tuple(shape)}")
    _library().loraq_unpack_mask(bits.data_ptr(), mask.numel(), mask.data_ptr())
    return mask


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, bool]:
    """Which elements of ``x`` dropout with probability ``p`` keeps: the draw of
    ``bernoulli_mask(x, 1 - p)`` (the same generator use), as ``(bits, True)`` at one bit per
    element where the kernel can pack it (see :func:`pack_mask`), else ``(mask, False)``."""
    if _kernel_applies(x, 1.0 - p) and packing_available():
        return _kernel_mask(x.numel(), 1.0 - p, torch.default_generator, packed=True), True
    return _compact(bernoulli_mask(x, 1.0 - p))


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(bits, True)`` for a mask :func:`pack_mask` can pack, else ``(mask, False)``."""
    bits = pack_mask(mask)
    return (mask, False) if bits is None else (bits, True)


def _expanded(keep: torch.Tensor, packed: bool, shape: torch.Size) -> torch.Tensor:
    """The 0/1 uint8 mask of ``shape`` that ``(keep, packed)`` from :func:`_compact` holds."""
    return unpack_mask(keep, shape) if packed else keep


def apply_keep(
    t: torch.Tensor, keep: torch.Tensor, packed: bool, *, inplace: bool = False
) -> torch.Tensor:
    """``t`` with the elements :func:`keep_mask` dropped set to zero (``t * mask``; in place
    with ``inplace``). Contiguous float32 CPU tensors are masked straight from the bits."""
    if packed and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
        if keep.numel() != -(-t.numel() // 8):
            raise ValueError(f"{keep.numel()} mask bytes do not cover a tensor of {t.numel()}")
        out = t if inplace else torch.empty_like(t)
        _library().loraq_keep_f32(t.data_ptr(), keep.data_ptr(), t.numel(), out.data_ptr())
        return out
    mask = _expanded(keep, packed, t.shape)
    return t.mul_(mask) if inplace else torch.mul(t, mask)


def _noise(mask: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor:
    # F.dropout's noise: the 0/1 mask in x's dtype, divided by the keep probability there
    return mask.to(dtype).div_(1.0 - p)


class _Dropout(torch.autograd.Function):
    """``x * noise`` that keeps the mask for backward at one bit per element (one byte where it
    cannot be packed) instead of the float noise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        # dropout() has checked that the kernel applies to x
        mask = _kernel_mask(x.numel(), 1.0 - p, torch.default_generator).view(x.shape)
        keep, ctx.packed = _compact(mask)
        ctx.p, ctx.dtype, ctx.shape = p, x.dtype, x.shape
        ctx.save_for_backward(keep)
        return x * _noise(mask, x.dtype, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        mask = _expanded(keep, ctx.packed, ctx.shape)
        return grad * _noise(mask, ctx.dtype, ctx.p), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, bit for bit ``torch.nn.functional.dropout(x, p)``, values and
    gradients.

    CPU dropout draws a mask with ``bernoulli_(1 - p)``, divides it by ``1 - p`` in ``x``'s
    dtype and multiplies; for a contiguous CPU ``x`` this does the same with
    :func:`bernoulli_mask`, and keeps the mask for backward at one bit per element where
    ``F.dropout`` keeps the noise in ``x``'s dtype. Anything else uses ``F.dropout`` itself.
    """
    if not (0.0 < p < 1.0 and _kernel_applies(x, 1.0 - p)):
        return torch.nn.functional.dropout(x, p, training=True)
    return _Dropout.apply(x, p)
