"""Where quantized layers dequantize their weight on CPU: reusable, shared scratch buffers.

A quantized linear layer needs its dense weight only for the span of one matmul. Writing it into
a buffer that every layer reuses keeps memory at the largest layer's size instead of a copy per
layer, and avoids the page faults of a fresh multi-megabyte tensor per call.
"""

from __future__ import annotations

import threading

import torch

from ..native.pages import empty_for_write


class DequantScratch:
    """Reusable dequantization buffers, one per (thread, dtype), for the layers that share it.

    On CPU a fresh multi-megabyte tensor costs more in page faults (the allocator returns large
    blocks to the OS on free) than the dequantization itself, so a quantized layer writes its
    dense weight into a buffer that every layer holding the same ``DequantScratch`` reuses: it
    keeps the largest layer's weight size, not a copy per layer. A tensor from :meth:`borrow` is
    valid only until the next :meth:`borrow` of the same dtype on the same thread. Copies of a
    model share the scratch of the original (it holds no state worth copying).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def borrow(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D CPU tensor of ``numel`` elements, overwritten by the next borrow on this thread."""
        buffers: dict[torch.dtype, torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            # A normal tensor even inside inference_mode, so later training steps may write to it.
            # Huge pages where large (see empty_for_write): fewer faults filling it, fewer TLB
            # misses in every matmul that reads it.
            with torch.inference_mode(False):
                buf = empty_for_write(numel, dtype, "cpu")
            buffers[dtype] = buf
        return buf[:numel]

    def release(self) -> None:
        """Free this thread's buffers (the next borrow allocates again)."""
        self._local.__dict__.pop("buffers", None)

    def __deepcopy__(self, memo: dict) -> DequantScratch:
        return self

    def __copy__(self) -> DequantScratch:
        return self

    def __reduce__(self) -> tuple:
        # Pickled models (multiprocessing, torch.save) get the shared scratch back, or a fresh one.
        return (_shared_scratch, ()) if self is SHARED_SCRATCH else (DequantScratch, ())


#: The scratch every quantized linear layer uses unless given another (or None) as ``scratch``.
SHARED_SCRATCH = DequantScratch()


def _shared_scratch() -> DequantScratch:
    return SHARED_SCRATCH


def release_scratch() -> None:
    """Free this thread's buffers of :data:`SHARED_SCRATCH`."""
    SHARED_SCRATCH.release()
