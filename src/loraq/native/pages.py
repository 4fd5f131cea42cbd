"""Output buffers for dense results: large ones asked to live on transparent huge pages.

A freshly allocated multi-megabyte CPU tensor is new memory: the first write to each 4 KiB page
faults into the kernel, which zeroes the page. For a dequantized weight that costs several times
the dequantization itself. Advising the range ``MADV_HUGEPAGE`` before the first write lets Linux
back it with 2 MiB pages (where transparent huge pages are ``always`` or ``madvise``): one fault
per 2 MiB instead of 512. Only the 2 MiB-aligned interior of the tensor is advised, so memory
outside it keeps its settings; elsewhere (another OS, huge pages ``never``) this changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

__all__ = ["empty_for_write"]

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
# Below this many bytes the faults cost little and a huge page could be mostly unused.
_MIN_BYTES = 4 * _HUGE_PAGE


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _advise_huge_pages(t: torch.Tensor) -> None:
    madvise = _madvise()
    if madvise is None:
        return
    start = t.data_ptr()
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    last = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if last > first:
        madvise(first, last - first, _MADV_HUGEPAGE)  # advice only: a failure changes nothing


def empty_for_write(numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty(numel)`` for a result the caller is about to write in full.

    On a Linux CPU, a tensor of 8 MiB or more is advised onto transparent huge pages (see the
    module docstring); the values and the tensor are otherwise those of ``torch.empty``.
    """
    out = torch.empty(numel, dtype=dtype, device=device)
    if out.device.type == "cpu" and numel * out.element_size() >= _MIN_BYTES:
        _advise_huge_pages(out)
    return out
