"""decompose(): truncated-SVD compression reaches the Eckart–Young optimum and reports savings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraq
from loraq.model.decompose import choose_rank


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


def test_fixed_rank_error_is_eckart_young_optimum() -> None:
    model = _mlp().double()
    weights = {"0": model[0].weight.detach().clone(), "2": model[2].weight.detach().clone()}
    biases = {"0": model[0].bias.detach().clone(), "2": model[2].bias.detach().clone()}
    report = loraq.decompose(model, rank=3)
    assert [layer.rank for layer in report.layers] == [3, 3]
    for name, w in weights.items():
        seq = model.get_submodule(name)
        assert isinstance(seq, nn.Sequential) and seq[0].out_features == 3
        approx = seq[1].weight @ seq[0].weight
        s = torch.linalg.svdvals(w)
        optimum = s[3:].square().sum().sqrt()
        # the error equals the optimal rank-3 error: no rank-3 matrix does better
        torch.testing.assert_close(torch.linalg.norm(w - approx), optimum)
        x = torch.randn(5, w.shape[1], dtype=torch.float64)
        torch.testing.assert_close(seq(x), x @ approx.t() + biases[name])
        # a random rank-3 matrix is worse
        rand = torch.randn(w.shape[0], 3, dtype=torch.float64) @ torch.randn(
            3, w.shape[1], dtype=torch.float64
        )
        assert torch.linalg.norm(w - rand) > optimum
    layer0 = report.layers[0]
    assert layer0.params_before == 24 * 16 + 16 and layer0.params_after == 24 * 3 + 3 * 16 + 16
    assert report.saving == pytest.approx(1 - report.params_after / report.params_before)
    assert "saving" in str(report)


def test_energy_picks_smallest_rank_keeping_fraction() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert choose_rank(s, None, 16 / 22) == 1
    assert choose_rank(s, None, 16.5 / 22) == 2
    assert choose_rank(s, None, 1.0) == 4
    assert choose_rank(s, 10, None) == 4
    model = _mlp()
    report = loraq.decompose(model, energy=0.9, targets=["0"])
    w_rank = report.layers[0].rank
    assert len(report.layers) == 1 and 1 <= w_rank <= 16
    assert isinstance(model[2], nn.Linear)


def test_full_rank_reproduces_layer() -> None:
    model = _mlp()
    x = torch.randn(4, 24)
    expected = model(x)
    loraq.decompose(model, rank=16)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"rank": 2, "energy": 0.5}, "exactly one of"),
        ({"rank": 0}, r"rank=0"),
        ({"energy": 1.5}, r"energy=1.5"),
        ({"rank": 2, "targets": ["nothing"]}, "matched no nn.Linear"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loraq.decompose(_mlp(), **kwargs)
