"""Stacked adapter weights for mixed-adapter batches, built once per adapter set and reused.

A mixed batch (:mod:`loraq.batching.mixed`) needs, for every LoRA layer, each adapter's A and B
side by side in one tensor so that a row can pick its adapter by index:

==========  =====================================  =============================================
tensor      shape                                  content
==========  =====================================  =============================================
``a``       ``(slots, r_max, in)``                 each adapter's A, zero-padded to the top rank
``b``       ``(slots, r_max, out)``                each adapter's B transposed, its scale folded
``dora``    ``(slots, out)`` or None               DoRA's column scale ``m / ||W + sBA||`` (1 for
                                                   plain adapters); None when no adapter is DoRA
==========  =====================================  =============================================

Slot 0 is "no adapter" (all zeros). A :class:`StackCache` holds these for every layer of a
model with the slots in one fixed order (all of the model's adapters), so rows joining or
leaving a running batch never re-stack anything: only a change of the adapter set does.

When is a cache stale? Structural changes (adding, deleting, merging an adapter, replacing or
rewriting a base, switching an adapter to k-bit weights) bump one process-wide counter,
:func:`adapter_epoch`, which costs one integer compare per forward to check. In-place edits of
adapter tensors (an optimizer step, ``load_state_dict``) move their version counters; reading
those is a Python loop over every adapter tensor, so :meth:`StackCache.refresh` does it only when
asked (``check_versions``): on every new batch plan, not on every decode step of the same plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

_epoch_counter = itertools.count(1)
_epoch = 0


def note_adapter_change() -> None:
    """Record that some layer's adapter set, base weight or adapter settings changed."""
    global _epoch
    _epoch = next(_epoch_counter)


def adapter_epoch() -> int:
    """A number that changes whenever :func:`note_adapter_change` is called."""
    return _epoch


class LayerStack(NamedTuple):
    """One layer's adapters stacked by slot (see the module table)."""

    a: torch.Tensor
    b: torch.Tensor
    dora: torch.Tensor | None


def stack_layer(layer: Any, slots: Sequence[str | None], device: torch.device) -> LayerStack:
    """The :class:`LayerStack` of ``layer`` (a ``LoRALayer``) for ``slots``.

    Slots whose name is None or absent from the layer are zeros (DoRA scale 1). Built from the
    adapters' forward weights (k-bit grids applied), so gradients flow back to them when enabled.
    The scale and the transpose of B are applied to the whole stack at once (a layer is a few
    tensor ops, not a few per adapter: a change of the adapter set re-stacks every layer).
    """
    dtype = layer._adapter_dtype()
    present = [n for n in slots if n is not None and n in layer.r]
    r_max = max((layer.r[n] for n in present), default=1)
    in_f, out_f = layer._in_out()
    zero_a = torch.zeros(r_max, in_f, dtype=dtype, device=device)
    zero_b = torch.zeros(out_f, r_max, dtype=dtype, device=device)
    a_rows, b_rows, scales = [], [], []
    for name in slots:
        if name is None or name not in layer.r:
            a_rows.append(zero_a)
            b_rows.append(zero_b)
            scales.append(0.0)
            continue
        a, b = layer._a_b_matrices(name)
        pad = r_max - layer.r[name]
        a_rows.append(F.pad(a.to(dtype), (0, 0, 0, pad)) if pad else a.to(dtype))
        b_rows.append(F.pad(b.to(dtype), (0, pad)) if pad else b.to(dtype))
        scales.append(layer.scaling[name])
    scale = torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)
    b_stack = (torch.stack(b_rows) * scale).transpose(1, 2).contiguous()
    return LayerStack(torch.stack(a_rows), b_stack, _dora_scales(layer, slots, dtype, device))


def _dora_scales(layer: Any, slots: Sequence[str | None], dtype, device) -> torch.Tensor | None:
    """``(slots, out)`` DoRA column scales ``m / ||W + sBA||`` (1 elsewhere), or None."""
    if not any(layer.use_dora.get(n, False) for n in slots if n is not None):
        return None
    out_f = layer._in_out()[1]
    ones = torch.ones(out_f, dtype=dtype, device=device)
    scales = []
    for name in slots:
        if name is None or not layer.use_dora.get(name, False):
            scales.append(ones)
            continue
        with torch.no_grad():
            norm = (layer.base_matrix().to(dtype) + layer.delta_matrix(name)).norm(dim=1)
        scales.append(layer.lora_magnitude_vector[name] / norm)
    return torch.stack(scales)


def _adapter_tensors(layer: Any) -> list[torch.Tensor]:
    """Every tensor the layer's stack is built from (A, B and DoRA magnitudes)."""
    tensors: list[torch.Tensor] = []
    for name in layer.r:
        tensors.extend(layer._a_b_params(name))
        if layer.use_dora[name]:
            tensors.append(layer.lora_magnitude_vector[name])
    return tensors


class StackCache:
    """The :class:`LayerStack` of every layer of one model, for all of its adapters.

    ``slots`` is ``(None, *adapters)`` in the order the layers first list them; ``stacks`` maps
    a layer to its stack (convolution layers, which mixed batches refuse, have none).
    ``generation`` grows by one at each rebuild. Built without gradients: it serves inference.
    """

    def __init__(self) -> None:
        self.slots: tuple[str | None, ...] = (None,)
        self.stacks: dict[Any, LayerStack] = {}
        self.generation = 0
        self._epoch = -1
        self._layers: list[Any] = []
        self._tensors: list[torch.Tensor] = []
        self._versions: list[int] = []
        self._placement: tuple | None = None

    def __deepcopy__(self, memo: dict) -> StackCache:
        return StackCache()  # a copied model re-stacks its own (copied) adapters

    def __getstate__(self) -> dict:
        return {}  # never pickled with a model: rebuilt on first use

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def refresh(self, layers: list[Any], *, check_versions: bool) -> None:
        """Rebuild unless the adapter set (and, if asked, every adapter tensor) is unchanged."""
        if self._is_current(layers, check_versions):
            return
        with torch.no_grad():
            self._rebuild(layers)

    def _is_current(self, layers: list[Any], check_versions: bool) -> bool:
        if self._epoch != _epoch or len(layers) != len(self._layers):
            return False
        if self._tensors:
            first = self._tensors[0]
            if (first.device, first.dtype) != self._placement:
                return False  # model.to(...) swaps tensor data without touching versions
        if check_versions:
            return [t._version for t in self._tensors] == self._versions
        return True

    def _rebuild(self, layers: list[Any]) -> None:
        names: dict[str, None] = {}
        for layer in layers:
            names.update(dict.fromkeys(layer.r))
        self.slots = (None, *names)
        self.stacks = {}
        tensors: list[torch.Tensor] = []
        for layer in layers:
            if layer.kind == "conv" or not layer.r:
                continue
            tensors.extend(_adapter_tensors(layer))
            device = layer._base_dtype_device()[1]
            self.stacks[layer] = stack_layer(layer, self.slots, device)
        self._epoch = _epoch
        self._layers = list(layers)
        self._tensors = tensors
        self._versions = [t._version for t in tensors]
        self._placement = (tensors[0].device, tensors[0].dtype) if tensors else None
        self.generation += 1
