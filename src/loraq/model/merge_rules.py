"""How several same-shaped task tensors become one: weighted sums, TIES, DARE, magnitude pruning.

The rules of PEFT's ``peft.utils.merge_utils`` (and so of the TIES and DARE papers), written to
the same operations in the same order, so that :func:`loraq.combine` and PEFT's
``add_weighted_adapter`` give the same tensors, and DARE draws the same random masks from the
same torch seed (one ``torch.bernoulli`` per tensor, in the order the tensors are given).

==================  ===========================================================================
rule                what happens to tensors ``t_i`` with weights ``w_i``
==================  ===========================================================================
``task_arithmetic`` ``sum_i w_i t_i``
``magnitude_prune`` keep each ``t_i``'s top ``density`` fraction by magnitude, then the sum
``ties``            prune by magnitude, elect each entry's sign (the sign of ``sum_i t_i``, or
                    of the count of signs), average the weighted entries that agree with it
``dare_linear``     keep each entry with probability ``density`` (rescaled by 1/density),
                    then the sum
``dare_ties``       DARE's random pruning, then TIES's sign election and disjoint mean
==================  ===========================================================================

``density`` is the fraction kept, in (0, 1]; 1 prunes nothing (and draws no random numbers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Values accepted for ``majority_sign``: elect by the sum of values, or by the count of signs.
MAJORITY_SIGN_METHODS = ("total", "frequency")

#: ``rule(tensors, weights, density, majority_sign) -> tensor``.
MergeRule = Callable[[list[torch.Tensor], torch.Tensor, float | None, str], torch.Tensor]


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked * weights`` with one weight per leading index."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[keep[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _prune_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    return tensor * mask / density


def _disjoint_mean(
    stacked: torch.Tensor, weights: torch.Tensor, majority_sign: str
) -> torch.Tensor:
    """TIES's sign election and mean over the entries that agree with the elected sign."""
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(magnitude >= 0, 1, -1)
    mixed = (_weighted(stacked, weights) * agrees).sum(dim=0)
    return mixed / torch.clamp(agrees.sum(dim=0), min=1.0)


def task_arithmetic(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str
) -> torch.Tensor:
    """``sum_i w_i t_i`` (``density`` and ``majority_sign`` are not used)."""
    return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str
) -> torch.Tensor:
    """Each tensor pruned to its largest ``density`` fraction, then the weighted sum."""
    pruned = [_prune_magnitude(t, density) for t in tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def ties(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str
) -> torch.Tensor:
    """TIES: prune by magnitude, elect signs, average the weighted entries that agree."""
    stacked = torch.stack([_prune_magnitude(t, density) for t in tensors], dim=0)
    return _disjoint_mean(stacked, weights, majority_sign)


def dare_linear(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str
) -> torch.Tensor:
    """DARE: drop entries at random (keep probability ``density``, rescaled), weighted sum."""
    pruned = [_prune_random(t, density) for t in tensors]
    return _weighted(torch.stack(pruned, dim=0), weights).sum(dim=0)


def dare_ties(
    tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str
) -> torch.Tensor:
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    stacked = torch.stack([_prune_random(t, density) for t in tensors], dim=0)
    return _disjoint_mean(stacked, weights, majority_sign)
