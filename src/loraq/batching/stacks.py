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

A rebuild is incremental: a layer's stack keeps the slices of every adapter whose tensors (by
identity and version), scale and rank are unchanged since the last build, copied from the old
stack, and stacks only the adapters that are new or changed (an adapter server loading one
adapter into 64 re-stacks one, not 64). DoRA layers are always re-stacked whole (their scale
depends on the base weight too).

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


def check_layer(layer: LoRALayer, slots: Sequence[str | None]) -> list[str]:
    """Names of ``slots`` (a plan's adapters; ``slots[0]`` is None) present on ``layer``;
    raises for what mixing cannot do."""
    if layer.kind == "conv":
        raise TypeError(
            "mixed-adapter batches are not supported on convolution layers "
            f"({type(layer.base_layer).__name__}); run one adapter per batch instead"
        )
    if layer.merged_adapters:
        raise RuntimeError(
            f"adapters {layer.merged_adapters} are merged into this layer's base; call "
            "loraq.unmerge(model) before running a mixed-adapter batch"
        )
    present = [n for n in slots[1:] if n in layer.r]
    if layer.training:
        for name in present:
            view = layer.adapter_view(name)
            if view.use_dora and view.dropout_p > 0:
                raise ValueError(
                    f"mixed-adapter training does not support DoRA adapter {name!r} with dropout "
                    f"{view.dropout_p}; set its dropout to 0 or train it on its own"
                )
    return present


class LayerStack(NamedTuple):
    """One layer's adapters stacked by slot (see the module table)."""

    a: torch.Tensor
    b: torch.Tensor
    dora: torch.Tensor | None
    #: each slot's own rank, int64 ``(slots,)`` (its rows of ``a`` and ``b`` past it are zeros),
    #: where the stack keeps it (:mod:`loraq.batching.pool`); else None
    ranks: torch.Tensor | None = None


def stack_layer(
    layer: LoRALayer,
    slots: Sequence[str | None],
    device: torch.device,
    views: dict[str, AdapterView] | None = None,
) -> LayerStack:
    """The :class:`LayerStack` of ``layer`` (a ``LoRALayer``) for ``slots``.

    Slots whose name is None or absent from the layer are zeros (DoRA scale 1). Built from the
    adapters' forward weights (k-bit grids applied), so gradients flow back to them when enabled.
    The scale and the transpose of B are applied to the whole stack at once (a layer is a few
    tensor ops, not a few per adapter: a change of the adapter set re-stacks every layer).
    Needs at least one of ``slots`` on the layer. ``views``: the layer's adapter views, when the
    caller has them already (reading a view is most of the cost of stacking small adapters).
    """
    if views is None:
        views = {n: layer.adapter_view(n) for n in slots if n is not None and n in layer.r}
    else:
        views = {n: views[n] for n in slots if n is not None and n in views}
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
        # per layer: the slots its stack was built with and each adapter's identity key
        self._built: dict[LoRALayer, tuple[tuple[str | None, ...], dict[str, tuple]]] = {}
        #: adapters stacked from their tensors by the last rebuild (not copied from the old stack)
        self.restacked = 0

    def __deepcopy__(self, memo: dict) -> StackCache:
        return StackCache()  # a copied model re-stacks its own (copied) adapters

    def __getstate__(self) -> dict:
        return {}  # never pickled with a model: rebuilt on first use

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    #: With gradients a mixed batch stacks the layers' adapters in the autograd graph instead.
    builds_in_graph = True

    def slot_index(self) -> dict[str | None, int]:
        """``{adapter: slot}`` of every stacked adapter, with None (no adapter) at 0."""
        return {name: i for i, name in enumerate(self.slots)}

    def active_stacks(
        self, layers: Sequence[LoRALayer], slots: Sequence[str | None]
    ) -> dict[LoRALayer, LayerStack]:
        """The stacks of ``layers`` holding at least one of ``slots`` (a plan's adapters, None
        first), each layer checked by :func:`check_layer`."""
        return {layer: self.stacks[layer] for layer in layers if check_layer(layer, slots)}

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
        old_stacks, old_built = self.stacks, self._built
        self.stacks, self._built, self.restacked = {}, {}, 0
        tensors: list[torch.Tensor] = []
        for layer in layers:
            if layer.kind == "conv" or not layer.r:
                continue
            views = {name: layer.adapter_view(name) for name in layer.r}
            keys = {}
            for name, view in views.items():
                tensors.extend(view.tensors())
                keys[name] = _identity(view)
            self.stacks[layer] = self._layer_stack(
                layer, views, keys, old_stacks.get(layer), old_built.get(layer)
            )
            self._built[layer] = (self.slots, keys)
        self._layers = list(layers)
        self._layer_versions = layer_versions(layers)
        self._tensors = tensors
        self._versions = [t._version for t in tensors]
        self._placement = (tensors[0].device, tensors[0].dtype) if tensors else None
        self.generation += 1

    def _layer_stack(
        self,
        layer: LoRALayer,
        views: dict[str, AdapterView],
        keys: dict[str, tuple],
        old: LayerStack | None,
        built: tuple[tuple[str | None, ...], dict[str, tuple]] | None,
    ) -> LayerStack:
        """``layer``'s stack over :attr:`slots`, reusing ``old`` for unchanged adapters."""
        device = next(iter(views.values())).base_device
        fresh = [n for n in self.slots[1:] if n in views]
        kept: list[tuple[int, int]] = []  # (new slot, old slot)
        r_max = max(v.rank for v in views.values())
        reusable = (
            old is not None
            and built is not None
            and old.dora is None
            and not any(v.use_dora for v in views.values())
            and old.a.device == device
            and old.a.dtype == next(iter(views.values())).dtype
        )
        if reusable:
            old_slots, old_keys = built
            old_index = {n: i for i, n in enumerate(old_slots)}
            kept = [
                (i, old_index[n])
                for i, n in enumerate(self.slots)
                if n in views and n in old_index and _same(old_keys.get(n), keys[n])
            ]
            reused = {self.slots[i] for i, _ in kept}
            fresh = [n for n in fresh if n not in reused]
        self.restacked += len(fresh)
        if not kept:
            return stack_layer(layer, self.slots, device, views)
        a = old.a.new_zeros((len(self.slots), r_max, old.a.shape[2]))
        b = old.b.new_zeros((len(self.slots), r_max, old.b.shape[2]))
        new_at = torch.tensor([i for i, _ in kept], device=device)
        old_at = torch.tensor([j for _, j in kept], device=device)
        # rows past an adapter's rank are zeros: the old padding narrows or widens freely
        a.index_copy_(0, new_at, _to_rank(old.a.index_select(0, old_at), r_max))
        b.index_copy_(0, new_at, _to_rank(old.b.index_select(0, old_at), r_max))
        if fresh:
            part = stack_layer(layer, (None, *fresh), device, views)
            at = torch.tensor([self.slots.index(n) for n in fresh], device=device)
            a.index_copy_(0, at, _to_rank(part.a[1:], r_max))
            b.index_copy_(0, at, _to_rank(part.b[1:], r_max))
        return LayerStack(a, b, None)


def _to_rank(rows: torch.Tensor, r_max: int) -> torch.Tensor:
    """``(n, r, features)`` slices cut or zero-padded to ``r_max`` along the rank."""
    r = rows.shape[1]
    return rows[:, :r_max] if r >= r_max else F.pad(rows, (0, 0, 0, r_max - r))


def _identity(view: AdapterView) -> tuple:
    """What a stacked slice of ``view`` depends on: its tensors (the objects themselves, so that
    a freed one's ``id`` cannot come back as a new adapter's; their storage and in-place
    version), scale, rank, k-bit grid and dtype. Equal keys (:func:`_same`): the slice holds."""
    tensors = view.tensors()
    return (
        tensors,
        tuple((t.data_ptr(), t._version) for t in tensors),
        view.scale,
        view.rank,
        view.bits,
        view.dtype,
    )


def _same(old: tuple | None, new: tuple) -> bool:
    return (
        old is not None
        and len(old[0]) == len(new[0])
        and all(x is y for x, y in zip(old[0], new[0]))
        and old[1:] == new[1:]
    )
