"""A serving pool's per-load work in one compiled call each (``slots.c``), with PyTorch twins.

:class:`~loraq.batching.pool.AdapterPool` writes an adapter into one slot of every layer it
adapts: A's rows as they are, B transposed with the scale folded in (:func:`write_slots`; or,
for an adapter loaded before in the same layout, :func:`place_slot` from records made once,
:func:`factor_records`, into the pool's table of stacks, :func:`stack_row`).
:mod:`loraq.io.adapter_check` checks that an adapter file holds no NaN or Inf
(:func:`first_nonfinite`). Done as tensor operations each costs a few per layer or per tensor,
more than the copies for a small adapter; here each is one call. Results are the same bits as
``torch.mul(b.t(), scale)`` and ``torch.isfinite`` give (tests compare). Built on first use like
every kernel (:mod:`loraq.native.build`, ``LORAQ_KERNELS``).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from .build import load_library

__all__ = [
    "SlotWrite",
    "available",
    "factor_records",
    "first_nonfinite",
    "place_slot",
    "stack_row",
    "write_slots",
]

_SOURCE = Path(__file__).with_name("slots.c")
_RECORD = 9  # int64 values per layer record (slots.c's S_SIZE)
_FACTOR = 6  # per staged factor record (F_SIZE)
_STACK = 7  # per row of the pool's table of stacks (T_SIZE)

#: One layer's write: ``(a, b, stack_a, stack_b, stack_ranks, slot, scale)``: ``a`` ``(rank,
#: in)`` and ``b`` ``(out, rank)`` as the file holds them, the layer's stacks (``(slots, r_max,
#: in)``, ``(slots, r_max, out)``, int64 ``(slots,)``; :mod:`loraq.batching.stacks`) and the slot.
SlotWrite = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library(_SOURCE, "adapter slot writes")
    if lib is None:
        return None
    lib.loraq_slot_record_size.argtypes, lib.loraq_slot_record_size.restype = [], ctypes.c_int64
    lib.loraq_place_record_sizes.argtypes = []
    lib.loraq_place_record_sizes.restype = ctypes.c_int64
    sizes = (lib.loraq_slot_record_size(), lib.loraq_place_record_sizes())
    if sizes != (_RECORD, _FACTOR * 100 + _STACK):  # the C layout and this one drifted apart
        raise RuntimeError("slots.c and slots.py disagree on the record sizes")
    lib.loraq_write_slots.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.loraq_write_slots.restype = None
    lib.loraq_place_slot.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2
    lib.loraq_place_slot.argtypes += [ctypes.c_int64, ctypes.c_int64]
    lib.loraq_place_slot.restype = ctypes.c_int64
    lib.loraq_first_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.loraq_first_nonfinite.restype = ctypes.c_int64
    return lib


def available() -> bool:
    """Whether the compiled kernels are in use (builds them on the first call)."""
    return _library() is not None


def _plain_f32(tensor: torch.Tensor) -> bool:
    # is_cpu, not device.type: this runs per tensor of every adapter load
    return tensor.dtype == torch.float32 and tensor.is_cpu and tensor.is_contiguous()


def write_slots(writes: Sequence[SlotWrite]) -> bool:
    """For every write, ``stack_a[slot, :rank] = a``, ``stack_b[slot, :rank] = b.t() * scale``
    (as ``torch.mul`` rounds it) and ``stack_ranks[slot] = rank``, in one call; False (nothing
    written) when the kernels are unavailable or a tensor is not a contiguous CPU tensor
    (float32; the ranks int64) of the shapes :data:`SlotWrite` describes."""
    lib = _library()
    if lib is None:
        return False
    values: list[int] = []
    for a, b, stack_a, stack_b, ranks, slot, scale in writes:
        factor, stack = _factor_row(a, b, _scale_bits(scale)), stack_row(stack_a, stack_b, ranks)
        if factor is None or stack is None:
            return False
        a_at, b_at, rank, n_in, n_out, bits = factor
        stack_a_at, stack_b_at, ranks_at, slots, r_max, stack_in, stack_out = stack
        if (stack_in, stack_out) != (n_in, n_out) or not (0 <= slot < slots and rank <= r_max):
            return False
        values += [
            a_at,
            b_at,
            stack_a_at + slot * r_max * n_in * 4,
            stack_b_at + slot * r_max * n_out * 4,
            ranks_at + slot * 8,
            rank,
            n_in,
            n_out,
            bits,
        ]
    records = torch.tensor(values, dtype=torch.int64)
    lib.loraq_write_slots(records.data_ptr(), len(writes))
    return True


def _scale_bits(scale: float) -> int:
    return struct.unpack("<i", struct.pack("<f", scale))[0]


def factor_records(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
) -> torch.Tensor | None:
    """:func:`place_slot`'s int64 records of ``(a, b, scale)`` per layer (``a`` ``(rank, in)``,
    ``b`` ``(out, rank)``), made once per adapter; None when the kernels are unavailable or a
    factor is not a contiguous float32 CPU tensor. The records hold the tensors' addresses: keep
    the tensors alive, unchanged, as long as the records."""
    if _library() is None:
        return None
    values: list[int] = []
    bits: dict[float, int] = {}  # an adapter's layers share one or two scales
    for a, b, scale in factors:
        if scale not in bits:
            bits[scale] = _scale_bits(scale)
        row = _factor_row(a, b, bits[scale])
        if row is None or a.shape[0] < 1:
            return None
        values += row
    return torch.tensor(values, dtype=torch.int64).view(-1, _FACTOR)


def _factor_row(a: torch.Tensor, b: torch.Tensor, scale_bits: int) -> list[int] | None:
    """``[a, b, rank, in, out, scale bits]`` of ``a`` ``(rank, in)`` and ``b`` ``(out, rank)``,
    contiguous float32 on the CPU; None for tensors of another kind or shape."""
    if not (_plain_f32(a) and _plain_f32(b) and a.ndim == 2 and b.ndim == 2):
        return None
    (rank, n_in), (n_out, b_rank) = a.shape, b.shape
    if b_rank != rank:
        return None
    return [a.data_ptr(), b.data_ptr(), rank, n_in, n_out, scale_bits]


def stack_row(a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor) -> list[int] | None:
    """One layer's row of :func:`place_slot`'s table: its stacked ``a`` ``(slots, r_max, in)``,
    ``b`` ``(slots, r_max, out)`` (contiguous float32 on CPU) and int64 ``ranks``; None for
    stacks of another kind."""
    if a.ndim != 3 or b.ndim != 3:
        return None
    slots, r_max = a.shape[:2]
    if not (
        _plain_f32(a)
        and _plain_f32(b)
        and tuple(b.shape[:2]) == (slots, r_max)
        and ranks.dtype == torch.int64
        and ranks.device.type == "cpu"
        and ranks.is_contiguous()
        and tuple(ranks.shape) == (slots,)
    ):
        return None
    return [a.data_ptr(), b.data_ptr(), ranks.data_ptr(), slots, r_max, a.shape[2], b.shape[2]]


def place_slot(table: torch.Tensor, factors: torch.Tensor, rows: torch.Tensor, slot: int) -> bool:
    """Write staged ``factors`` (:func:`factor_records`) into ``slot`` of the stacks in
    ``table`` (int64, one :func:`stack_row` per row) at rows ``rows`` (int64, one per record),
    as :func:`write_slots` writes them, after zeroing the rows the slot's previous adapter left
    beyond each new rank (its ``ranks`` entry says how many). False (nothing written) when the
    kernels are unavailable or a record does not fit its stack (shape, rank, slot)."""
    lib = _library()
    if lib is None or not (
        table.dtype == factors.dtype == rows.dtype == torch.int64
        and table.is_contiguous()
        and factors.is_contiguous()
        and rows.is_contiguous()
        and table.shape[-1:] == (_STACK,)
        and factors.shape[-1:] == (_FACTOR,)
        and rows.shape == factors.shape[:1]
    ):
        return False
    refused = lib.loraq_place_slot(
        table.data_ptr(), table.shape[0], factors.data_ptr(), rows.data_ptr(), len(rows), slot
    )
    return refused == -1


def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first of ``tensors`` (contiguous float32 on CPU) holding a NaN or an
    Inf, -1 when none does, or None when the kernels are unavailable or a tensor is of another
    kind (then nothing was checked)."""
    lib = _library()
    if lib is None or not all(_plain_f32(t) for t in tensors):
        return None
    addresses = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    lengths = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    return int(lib.loraq_first_nonfinite(addresses.data_ptr(), lengths.data_ptr(), len(tensors)))
