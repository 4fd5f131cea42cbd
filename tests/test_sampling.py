"""Sampling a batch's rows at once (``sample_each``) against one ``sample_next`` call per row:
the same tokens from the same generator states, which must advance the same way."""

from __future__ import annotations

import pytest
import torch

from loraq.generation.sampling import sample_each, sample_next

SETTINGS = [
    (0.0, None, None),  # greedy
    (1.0, None, None),
    (0.7, 40, None),
    (1.3, None, 0.9),
    (1.0, 5, 0.5),
    (1.0, None, None),  # shares the second row's group
]


@pytest.mark.parametrize("vocab", [7, 512, 49152])
def test_rows_sampled_together_pick_what_each_row_picks_alone(vocab):
    rows = 3 * len(SETTINGS)
    settings = [SETTINGS[i % len(SETTINGS)] for i in range(rows)]
    for step in range(5):
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(step)) * 4
        if vocab > 7:
            logits[1, vocab // 2 :] = float("-inf")  # a row with impossible tokens
        seeds = [100 * step + i for i in range(rows)]
        together_gens = [torch.Generator().manual_seed(s) for s in seeds]
        alone_gens = [torch.Generator().manual_seed(s) for s in seeds]
        together = sample_each(logits, settings, together_gens)
        alone = [
            int(sample_next(logits[i : i + 1], *settings[i], alone_gens[i])[0]) for i in range(rows)
        ]
        assert together == alone
        # and the generators moved on alike: the next draws agree too
        for a, b in zip(together_gens, alone_gens):
            assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_rows_without_a_generator_draw_from_the_global_one_in_row_order():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    settings = [(1.0, None, None), (0.5, None, None), (1.0, None, None), (0.0, None, None)]
    torch.manual_seed(7)
    together = sample_each(logits, settings, [None] * 4)
    torch.manual_seed(7)
    alone = [int(sample_next(logits[i : i + 1], *settings[i])[0]) for i in range(4)]
    assert together == alone


def test_a_row_without_a_valid_distribution_raises_as_multinomial_does():
    logits = torch.zeros(2, 5)
    logits[1] = float("nan")
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        sample_each(logits, [(1.0, None, None)] * 2, gens)
    assert sample_each(torch.zeros(1, 5), [(0.0, None, None)], [None]) == [0]
