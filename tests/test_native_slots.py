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


def _table(*stacks):
    return torch.tensor([slots.stack_row(*s) for s in stacks], dtype=torch.int64)


def test_staged_placement_equals_slot_writes_and_clears_what_the_last_adapter_left():
    gen = torch.Generator().manual_seed(1)
    placed, written = (_stacks(), _stacks(n_in=6, n_out=9)), (_stacks(), _stacks(n_in=6, n_out=9))
    old = [(torch.randn(7, n_in, generator=gen), torch.randn(n_out, 7, generator=gen))
           for n_in, n_out in ((12, 20), (6, 9))]  # fmt: skip
    for stacks in (placed, written):  # slot 2 holds a rank-7 adapter on both layers
        assert slots.write_slots([(a, b, *s, 2, 0.5) for (a, b), s in zip(old, stacks)])
    new = [(torch.randn(3, 12, generator=gen), torch.randn(20, 3, generator=gen), 0.25),
           (torch.randn(8, 6, generator=gen), torch.randn(9, 8, generator=gen), 2.0)]  # fmt: skip
    records = slots.factor_records(new)
    assert slots.place_slot(_table(*placed), records, torch.tensor([0, 1]), 2)
    for stacks in written:  # the reference: what the checked path does
        stacks[0][2].zero_(), stacks[1][2].zero_()
    assert slots.write_slots([(a, b, *s, 2, scale) for (a, b, scale), s in zip(new, written)])
    for got, want in zip(placed, written):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_bad_placements_are_refused_and_write_nothing():
    stacks = _stacks()
    table = _table(stacks)
    a, b = torch.ones(2, 12), torch.ones(20, 2)
    good = slots.factor_records([(a, b, 1.0)])
    wrong_in = slots.factor_records([(torch.ones(2, 6), torch.ones(20, 2), 1.0)])
    too_wide = slots.factor_records([(torch.ones(9, 12), torch.ones(20, 9), 1.0)])
    for records, rows, slot in [
        (good, torch.tensor([1]), 1),  # no table row 1
        (good, torch.tensor([0]), 0),  # slot 0 is no adapter's
        (good, torch.tensor([0]), 5),  # no slot 5
        (wrong_in, torch.tensor([0]), 1),
        (too_wide, torch.tensor([0]), 1),  # rank 9 > r_max 8
        (torch.cat([good, wrong_in]), torch.tensor([0, 0]), 1),  # the second refuses both
    ]:
        assert not slots.place_slot(table, records, rows, slot)
        assert not any(t.any() for t in stacks)
    assert slots.factor_records([(a.double(), b, 1.0)]) is None
    assert slots.factor_records([(a, b.t(), 1.0)]) is None  # not contiguous
    assert slots.stack_row(stacks[0][:, :, :6], stacks[1], stacks[2]) is None
    assert slots.stack_row(stacks[0], torch.zeros(5, 8), stacks[2]) is None  # B not 3-D
