"""``nn.Dropout`` with its masks drawn by loraq's compiled kernel: the same values, faster.

:class:`FastDropout` gives exactly ``nn.Dropout``'s outputs and gradients under the same seed
(see :mod:`loraq.native.bernoulli`); on CPUs where PyTorch draws masks in a serial loop it draws
them several times faster, and it keeps the mask for backward at one bit per element instead of
a float copy.
:func:`use_fast_dropout` switches a model's dropout layers over in place (:func:`loraq.apply`
does this for the model it adapts, and :func:`loraq.unload` switches them back with
:func:`plain_dropout`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..native.bernoulli import dropout

__all__ = ["FastDropout", "plain_dropout", "use_fast_dropout"]


class FastDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, ``inplace``, state and ``isinstance``) whose training-mode
    masks come from :func:`loraq.native.bernoulli.dropout`. In-place dropout, evaluation mode
    and ``p`` of 0 or 1 behave exactly as ``nn.Dropout``, by running it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.inplace and 0.0 < self.p < 1.0:
            return dropout(x, self.p)
        return super().forward(x)


def use_fast_dropout(model: nn.Module) -> int:
    """Make every plain ``nn.Dropout`` in ``model`` a :class:`FastDropout`; returns how many.

    The modules change class in place, so they keep their identity, hooks and training flag, and
    code that holds them (or reads ``.p``) sees no difference. Subclasses of ``nn.Dropout`` are
    left alone: they may change what dropout does.
    """
    _check_module(model, "use_fast_dropout")
    count = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            count += 1
    return count


def plain_dropout(model: nn.Module) -> int:
    """Undo :func:`use_fast_dropout`: every :class:`FastDropout` in ``model`` becomes a plain
    ``nn.Dropout`` again (in place); returns how many."""
    _check_module(model, "plain_dropout")
    count = 0
    for module in model.modules():
        if type(module) is FastDropout:
            module.__class__ = nn.Dropout
            count += 1
    return count


def _check_module(model: object, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() needs a torch.nn.Module, got {type(model).__name__}")
