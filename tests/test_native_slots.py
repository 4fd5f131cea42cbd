"""The serving pool's compiled per-load work (``native/slots.c``) against its PyTorch twins:
slot writes bit-equal to ``copy_`` and ``torch.mul``, the finiteness scan equal to
``torch.isfinite``, and refusals that write nothing."""

from __future__ import annotations

import pytest
import torch

from loraq.native import slots

pytestmark = pytest.mark.skipif(not slots.available(), reason="no C compiler")


def _stacks(rows=5, r_max=8, n_in=12, n_out=20):
    a = torch.zeros(rows, r_max, n_in)
    b = torch.zeros(rows, r_max, n_out)
    return a, b, torch.zeros(rows, dtype=torch.int64)


def test_slot_writes_equal_the_tensor_operations_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    stacks, want = _stacks(), _stacks()
    writes = []
    for slot, rank, scale in [(1, 8, 0.125), (3, 3, 2 / 3**0.5), (4, 1, 1e-3)]:
        a = torch.randn(rank, 12, generator=gen)
        b = torch.randn(20, rank, generator=gen)
        writes.append((a, b, *stacks, slot, scale))
        want[0][slot, :rank].copy_(a)
        torch.mul(b.t(), scale, out=want[1][slot, :rank])
        want[2][slot] = rank
    assert slots.write_slots(writes)
    for got, expected in zip(stacks, want):
        assert torch.equal(got, expected)


def test_bad_slot_writes_are_refused_and_write_nothing():
    a, b = torch.ones(2, 12), torch.ones(20, 2)
    stack_a, stack_b, ranks = _stacks()
    bad = [
        (a.double(), b, stack_a, stack_b, ranks, 1, 1.0),  # dtype
        (a, b.t().contiguous(), stack_a, stack_b, ranks, 1, 1.0),  # B not (out, rank)
        (a, b, stack_a, stack_b, ranks, 5, 1.0),  # no slot 5
        (a, b, stack_a, stack_b, ranks.int(), 1, 1.0),  # ranks not int64
        (torch.ones(9, 12), torch.ones(20, 9), stack_a, stack_b, ranks, 1, 1.0),  # rank > r_max
        (a, b, stack_a[:, :, :6], stack_b, ranks, 1, 1.0),  # a view, not contiguous
    ]
    for write in bad:
        good = (a, b, stack_a, stack_b, ranks, 2, 1.0)
        assert not slots.write_slots([good, write])
        assert not stack_a.any() and not stack_b.any() and not ranks.any()


def test_first_nonfinite_finds_the_first_array_with_nan_or_inf():
    tensors = [torch.randn(n) for n in (3, 1000, 7, 0, 64)]
    assert slots.first_nonfinite(tensors) == -1
    for index, bad in [(1, float("nan")), (2, float("inf")), (4, float("-inf"))]:
        poisoned = [t.clone() for t in tensors]
        poisoned[index][-1] = bad
        assert slots.first_nonfinite(poisoned) == index
        assert not bool(torch.isfinite(poisoned[index]).all())
    assert slots.first_nonfinite([torch.ones(3, dtype=torch.float16)]) is None
    assert slots.first_nonfinite([torch.ones(4, 4).t()]) is None  # not contiguous
