"""The public contract between :class:`~loraq.layers.lora.LoRALayer` and code that runs its
adapters in other ways (mixed-adapter batches, :mod:`loraq.batching`).

Such code reads an adapter only through :meth:`LoRALayer.adapter_view` and takes over a layer's
forward only through :meth:`LoRALayer.set_row_hook`:

=====================  ============================================================================
name                   what it is
=====================  ============================================================================
:class:`AdapterView`   one adapter of one layer as plain facts: rank, scale, dropout, dtype, shape,
                       the base's dtype and device, and its factors A and B as the forward uses them
:class:`LayerFactors`  one adapter's factors for one layer as plain tensors, as a file holds them
:class:`RowHook`       an object that computes the whole output of a layer; while
                       ``layer.row_hook`` is set (and adapters are not disabled) ``forward`` calls
                       it instead of running the layer's own adapters
``adapter_version``    a per-layer counter that grows whenever something a stacked copy of the
                       adapters depends on changes: adapters added or deleted, k-bit grids switched,
                       the base replaced or rewritten (merge, PiSSA). In-place edits of adapter
                       tensors move their own ``_version`` counters instead (see
                       :meth:`AdapterView.tensors`)
=====================  ============================================================================

``layers`` never imports its users: the hook is installed from above (``batching`` sets and
clears it), so the import graph keeps running downward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .adapter_quant import round_to_grid


@dataclass(frozen=True)
class AdapterView:
    """Adapter ``name`` of one ``LoRALayer``, read-only (see the module table).

    ``dropout_p`` is the probability the forward pass applies now (0 in eval mode). ``a`` and
    ``b`` are the stored parameters (``lora_A``/``lora_B`` weights or the embedding factors);
    :meth:`factors` gives them as the forward pass uses them.
    """

    name: str
    rank: int
    scale: float
    dropout_p: float
    use_dora: bool
    bits: int | None
    dtype: torch.dtype
    in_features: int
    out_features: int
    base_dtype: torch.dtype
    base_device: torch.device
    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (rank, in)`` and ``B (out, rank)``, on their k-bit grid when ``bits`` is set.

        Unscaled (``delta = scale * B @ A``); gradients flow back to :attr:`a` and :attr:`b`.
        """
        a, b = self.a, self.b
        if self.bits is not None:
            a, b = round_to_grid(a, self.bits), round_to_grid(b, self.bits)
        return a.flatten(1), b.flatten(1)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every stored tensor the adapter's output depends on (A, B and DoRA's magnitude)."""
        return (self.a, self.b) if self.magnitude is None else (self.a, self.b, self.magnitude)


class LayerFactors(NamedTuple):
    """One adapter's tensors for one layer, as an adapter file holds them: what code that keeps
    adapters outside the layer's own tables (a serving pool) reads and checks.

    ``a`` is ``(rank, in)`` and ``b`` ``(out, rank)`` (an embedding's ``in`` is its vocabulary);
    ``delta = scale * b @ a``. ``magnitude`` is DoRA's ``(out,)`` vector, or None.
    ``base_weight``: the base layer's own weight when the file carries it (PEFT saves adapted
    embeddings' weights by default), which the adapter was trained on; else None.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    base_weight: torch.Tensor | None = None


@runtime_checkable
class RowHook(Protocol):
    """Computes a ``LoRALayer``'s output in place of its own forward (e.g. one adapter per row).

    Installed by the code that owns it with ``layer.set_row_hook(hook)`` and removed after
    (``set_row_hook(None)``); meanwhile ``LoRALayer.forward(x, *args, **kwargs)`` returns
    ``hook(layer, x, *args, **kwargs)``.
    """

    def __call__(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output for input ``x``."""
        ...
