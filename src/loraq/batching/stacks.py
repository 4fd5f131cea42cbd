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
rewriting a base, switching an adapter to k-bit weights) bump the layer's own
``adapter_version``; comparing those costs one attribute read per layer and forward, and a
change in one model never invalidates another's stacks. In-place edits of adapter tensors (an
optimizer step, ``load_state_dict``) move the tensors' version counters; reading those is a
Python loop over every adapter tensor, so :meth:`StackCache.refresh` does it only when asked
(``check_versions``): on every new batch plan, not on every decode step of the same plan.

Layers are read only through their public contract (:mod:`loraq.layers.adapter_view`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..layers.adapter_view import AdapterView
from ..layers.lora import LoRALayer


def layer_versions(layers: Sequence[LoRALayer]) -> list[int]:
    """Each layer's ``adapter_version``: a list that differs once any layer changed."""
    return [layer.adapter_version for layer in layers]


class LayerStack(NamedTuple):
    """One layer's adapters stacked by slot (see the module table)."""

    a: torch.Tensor
    b: torch.Tensor
    dora: torch.Tensor | None


def stack_layer(layer: LoRALayer, slots: Sequence[str | None], device: torch.device) -> LayerStack:
    """The :class:`LayerStack` of ``layer`` (a ``LoRALayer``) for ``slots``.

    Slots whose name is None or absent from the layer are zeros (DoRA scale 1). Built from the
    adapters' forward weights (k-bit grids applied), so gradients flow back to them when enabled.
    The scale and the transpose of B are applied to the whole stack at once (a layer is a few
    tensor ops, not a few per adapter: a change of the adapter set re-stacks every layer).
    Needs at least one of ``slots`` on the layer.
    """
    views = {n: layer.adapter_view(n) for n in slots if n is not None and n in layer.r}
    if not views:
        raise ValueError(f"none of the adapters {list(slots[1:])} is on this layer")
    first = next(iter(views.values()))
    dtype = first.dtype
    r_max = max(v.rank for v in views.values())
    zero_a = torch.zeros(r_max, first.in_features, dtype=dtype, device=device)
    zero_b = torch.zeros(first.out_features, r_max, dtype=dtype, device=device)
    a_rows, b_rows, scales = [], [], []
    for name in slots:
        view = views.get(name)
        if view is None:
            a_rows.append(zero_a)
            b_rows.append(zero_b)
            scales.append(0.0)
            continue
        a, b = view.factors()
        pad = r_max - view.rank
        a_rows.append(F.pad(a.to(dtype), (0, 0, 0, pad)) if pad else a.to(dtype))
        b_rows.append(F.pad(b.to(dtype), (0, pad)) if pad else b.to(dtype))
        scales.append(view.scale)
    scale = torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1)
    b_stack = (torch.stack(b_rows) * scale).transpose(1, 2).contiguous()
    return LayerStack(torch.stack(a_rows), b_stack, _dora_scales(layer, slots, views, device))


def _dora_scales(
    layer: LoRALayer, slots: Sequence[str | None], views: dict[str | None, AdapterView], device
) -> torch.Tensor | None:
    """``(slots, out)`` DoRA column scales ``m / ||W + sBA||`` (1 elsewhere), or None."""
    if not any(v.use_dora for v in views.values()):
        return None
    first = next(iter(views.values()))
    dtype = first.dtype
    ones = torch.ones(first.out_features, dtype=dtype, device=device)
    scales = []
    for name in slots:
        view = views.get(name)
        if view is None or view.magnitude is None:
            scales.append(ones)
            continue
        with torch.no_grad():
            norm = (layer.base_matrix().to(dtype) + layer.delta_matrix(name)).norm(dim=1)
        scales.append(view.magnitude / norm)
    return torch.stack(scales)


class StackCache:
    """The :class:`LayerStack` of every layer of one model, for all of its adapters.

    ``slots`` is ``(None, *adapters)`` in the order the layers first list them; ``stacks`` maps
    a layer to its stack (convolution layers, which mixed batches refuse, have none).
    ``generation`` grows by one at each rebuild. Built without gradients: it serves inference.
    """

    def __init__(self) -> None:
        self.slots: tuple[str | None, ...] = (None,)
        self.stacks: dict[LoRALayer, LayerStack] = {}
        self.generation = 0
        self._layers: list[LoRALayer] = []
        self._layer_versions: list[int] = []
        self._tensors: list[torch.Tensor] = []
        self._versions: list[int] = []
        self._placement: tuple | None = None

    def __deepcopy__(self, memo: dict) -> StackCache:
        return StackCache()  # a copied model re-stacks its own (copied) adapters

    def __getstate__(self) -> dict:
        return {}  # never pickled with a model: rebuilt on first use

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def refresh(
        self, layers: list[LoRALayer], versions: list[int], *, check_versions: bool
    ) -> None:
        """Rebuild unless the layers, their ``versions`` (:func:`layer_versions`, read by the
        caller) and, if asked, every adapter tensor's version are unchanged."""
        if self._is_current(layers, versions, check_versions):
            return
        with torch.no_grad():
            self._rebuild(layers)

    def _is_current(self, layers: list[LoRALayer], versions: list[int], check: bool) -> bool:
        # list equality compares modules by identity; versions catch structural changes
        if layers != self._layers or versions != self._layer_versions:
            return False
        if self._tensors:
            first = self._tensors[0]
            if (first.device, first.dtype) != self._placement:
                return False  # model.to(...) swaps tensor data without touching versions
        if check:
            return [t._version for t in self._tensors] == self._versions
        return True

    def _rebuild(self, layers: list[LoRALayer]) -> None:
        names: dict[str, None] = {}
        for layer in layers:
            names.update(dict.fromkeys(layer.r))
        self.slots = (None, *names)
        self.stacks = {}
        tensors: list[torch.Tensor] = []
        for layer in layers:
            if layer.kind == "conv" or not layer.r:
                continue
            views = [layer.adapter_view(name) for name in layer.r]
            for view in views:
                tensors.extend(view.tensors())
            self.stacks[layer] = stack_layer(layer, self.slots, views[0].base_device)
        self._layers = list(layers)
        self._layer_versions = layer_versions(layers)
        self._tensors = tensors
        self._versions = [t._version for t in tensors]
        self._placement = (tensors[0].device, tensors[0].dtype) if tensors else None
        self.generation += 1
