"""A clear error for ``backward()`` through adapters that are merged into their base.

After :func:`loraq.merge` a layer computes with the merged base weight only, so its adapter
tensors (still marked trainable) take no part in the graph and torch's own error ("element 0 of
tensors does not require grad") gives no hint why. :func:`guard_merged` ties the layer's output
to one of those tensors through an identity whose backward raises an error that says what to do.
It costs one view in forward and does nothing under ``torch.no_grad()`` (inference).
"""

from __future__ import annotations

from typing import Any

import torch


class _MergedAdapterGuard(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, anchor: torch.Tensor, names: tuple[str, ...]):
        ctx.names = names
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        raise RuntimeError(
            f"backward() reached adapter(s) {list(ctx.names)}, which are merged into the base "
            "weights and get no gradient there: call loraq.unmerge(model) before training "
            "(merge is for inference)"
        )


def guard_merged(
    out: torch.Tensor, merged: list[str], trainable: list[torch.Tensor]
) -> torch.Tensor:
    """``out`` unchanged, but a backward pass through it raises a hint to unmerge.

    ``merged`` names the merged adapters, ``trainable`` their tensors that require grad; with no
    such tensor (a frozen, merged adapter) or with grad disabled, ``out`` is returned as is.
    """
    if not torch.is_grad_enabled() or not trainable or not out.is_floating_point():
        return out
    return _MergedAdapterGuard.apply(out, trainable[0], tuple(merged))
