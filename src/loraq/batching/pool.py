"""Resident adapters held as data: a fixed set of slots per LoRA layer, filled and emptied in
place (the serving pool of ``loraq serve``, as S-LoRA and LoRAX keep theirs).

A server that swaps adapters in and out on most requests cannot afford what adding an adapter
to a model costs (two ``nn.Module`` s per adapted layer, a snapshot for all-or-nothing, a
re-stack of every resident adapter). An :class:`AdapterPool` keeps each resident adapter only
as rows of per-layer stacks, in the layout mixed batches read (:mod:`loraq.batching.stacks`):

==========  ===========================  ====================================================
tensor      shape                        content
==========  ===========================  ====================================================
``a``       ``(slots, r_max, in)``       each slot's A, zero past its rank; slot 0 is no adapter
``b``       ``(slots, r_max, out)``      each slot's B transposed, its scale folded in
``dora``    ``(slots, out)`` or None     DoRA's ``m / ||W + sBA||`` (1 for other slots); None
                                         until a DoRA adapter is loaded on the layer
``ranks``   ``(slots,)`` int64           each slot's rank, so a kernel reads no zeros
==========  ===========================  ====================================================

A taken slot's rows past its adapter's rank, and on layers it does not adapt, are zeros. An
eviction only forgets the slot (no row reads a free one); the next load into it writes its
rank's rows and zeroes only what the evicted adapter left beyond them.

- :meth:`AdapterPool.load` writes one adapter into a free slot of each layer it adapts (two
  tensor copies per layer) and :meth:`AdapterPool.evict` frees the slot: no module is created,
  no other adapter is touched. A server that swaps adapters on most requests stages each one
  once (:func:`stage_factors`, kept with its host copy): loads of a staged adapter whose layout
  (modules and shapes) the pool has loaded before skip the per-layer checks and write every
  layer in one compiled call (:func:`loraq.native.slots.place_slot`). Layers not yet wrapped in a
  :class:`~loraq.layers.lora.LoRALayer` are wrapped (with no adapter of their own) on the first
  load that adapts them; their output is unchanged.
- Everything is checked before anything changes (shapes, kinds, ranks, room), so a refused
  load leaves the pool and the model as they were.
- Stacks grow (slots by doubling up to ``capacity + 1``, ranks to the largest loaded) by
  reallocation; a layer's rank shrinks back once the adapters left need at most half of it.
- ``generation`` grows at every load and eviction; a :class:`~loraq.batching.mixed.MixedBatch`
  built over the pool (:func:`loraq.batching.rows.mixed_batch` with ``pool=``) re-reads its
  slots then. The pool serves inference: its tensors carry no gradients.

Adapters in the model's own layers (``loraq.apply``, ``load_adapter``) are not seen by a mixed
batch over the pool; :meth:`AdapterPool.load_from_model` copies one in.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..layers.adapter_view import LayerFactors
from ..layers.kinds import layer_kind
from ..layers.lora import LoRALayer
from ..model.surgery import lora_layers
from ..model.targeting import set_submodule
from ..native import slots as slot_kernels
from .stacks import LayerStack

#: Kinds of layer the pool runs adapters on (convolutions take no per-row adapters).
POOL_KINDS = ("linear", "conv1d_gpt2", "embedding")
#: Slots a layer's stacks start with (slot 0 included) before growing by doubling.
FIRST_SLOTS = 4

_LOADS = itertools.count(1)
_STAGINGS = itertools.count(1)


class StagedFactors(NamedTuple):
    """An adapter's per-module factors made ready for repeated loads (:func:`stage_factors`).

    ``layout`` is ``((path, rank, in, out), ...)`` in ``factors``' order (by path): adapters of
    one layout pass the same checks, so the pool checks a layout once. ``records`` are the
    compiled write's records of the factors (:func:`loraq.native.slots.factor_records`), or None
    where that write cannot be used (no compiler, DoRA, a base weight carried, factors not
    float32 on the CPU): such adapters load through the checked path every time. ``serial`` is
    unique to this staging: loads of the same staged factors compute the same rows, so they
    share one :meth:`AdapterPool.identity` and cached prompts outlive evictions.
    """

    factors: dict[str, LayerFactors]
    layout: tuple[tuple[str, int, int, int], ...]
    records: torch.Tensor | None
    serial: int


def stage_factors(factors: dict[str, LayerFactors]) -> StagedFactors:
    """``factors`` (as :func:`loraq.io.peft_factors.layer_factors` gives them) staged for
    :meth:`AdapterPool.load`; the tensors are kept as they are and must not change."""
    factors = dict(sorted(factors.items()))  # one order per layout, whatever the file's
    layout = tuple((path, f.a.shape[0], f.a.shape[-1], f.b.shape[0]) for path, f in factors.items())
    plain = all(f.magnitude is None and f.base_weight is None for f in factors.values())
    records = (
        slot_kernels.factor_records([(f.a, f.b, f.scale) for f in factors.values()])
        if plain and factors
        else None
    )
    return StagedFactors(factors, layout, records, next(_STAGINGS))


class PoolError(ValueError):
    """A load the pool refuses (the message names the adapter and the offending tensor or layer);
    nothing changed."""


class AdapterPool:
    """Up to ``capacity`` adapters of ``model``, resident as slots of per-layer stacks (see the
    module doc). ``slots``, ``stacks``, ``generation`` and the methods :meth:`refresh`,
    :meth:`slot_index` and :meth:`active_stacks` are what a ``MixedBatch`` reads, as from a
    :class:`~loraq.batching.stacks.StackCache`.

    Not thread-safe: loads, evictions and the forward passes that read the stacks must not
    overlap (``loraq serve`` runs them all under its model lock).
    """

    #: Mixed batches over the pool read its stacks as they are, with or without gradients.
    builds_in_graph = False

    def __init__(self, model: nn.Module, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"an adapter pool needs capacity >= 1, got {capacity}")
        self.model = model
        self.capacity = capacity
        self.slots: tuple[str | None, ...] = (None,)
        self.stacks: dict[LoRALayer, LayerStack] = {}
        self.generation = 0
        #: grows when a layer is wrapped for the pool (the layer list a batch hooks changes)
        self.layout = 0
        self._by_path: dict[str, LoRALayer] = {}
        self._ranks: dict[LoRALayer, dict[str, int]] = {}  # per layer: resident adapter -> rank
        # adapter -> what its rows compute from: its load's number, or its staging's
        self._loads: dict[str, Hashable] = {}
        # per free slot: the layers an evicted adapter left rows in, and how many
        self._stale: dict[int, dict[LoRALayer, int]] = {}
        self._rows = min(FIRST_SLOTS, capacity + 1)  # every stack's slot count (slot 0 too)
        # staged loads: per checked layout, its layers and their rows in the table of stacks
        # the compiled write reads (rebuilt when a stack is replaced; None: not all float32 CPU)
        self._plans: dict[tuple, tuple[tuple[LoRALayer, ...], torch.Tensor]] = {}
        self._table_rows: dict[LoRALayer, int] = {}
        self._table: torch.Tensor | None = None
        self._table_stale = True

    # ------------------------------------------------------------------ what batches read
    @property
    def layers(self) -> list[LoRALayer]:
        """The layers the pool keeps stacks for, in the order they were first adapted."""
        return list(self.stacks)

    def names(self) -> list[str]:
        """Resident adapters, in slot order."""
        return [n for n in self.slots[1:] if n is not None]

    def __contains__(self, name: object) -> bool:
        return name in self._loads

    def __len__(self) -> int:
        return len(self._loads)

    def ranks(self, name: str) -> dict[LoRALayer, int]:
        """``{layer: rank}`` of resident adapter ``name`` (empty when it is not resident)."""
        return {layer: held[name] for layer, held in self._ranks.items() if name in held}

    def identity(self, name: str | None) -> Hashable:
        """What a cached result computed with adapter ``name`` depends on: the name and the
        load it came from (a reload of the same name is another identity), or for staged
        factors (:func:`stage_factors`) the staging: reloads of one staged object keep it."""
        return None if name is None else (name, self._loads.get(name))

    def refresh(
        self, layers: list[LoRALayer], versions: list[int], *, check_versions: bool
    ) -> None:
        """Nothing to do: the slots are written when adapters load, not rebuilt on use."""

    def slot_index(self) -> dict[str | None, int]:
        """``{adapter: slot}`` for the resident adapters, with None (no adapter) at 0."""
        index: dict[str | None, int] = {n: i for i, n in enumerate(self.slots) if n is not None}
        index[None] = 0
        return index

    def active_stacks(
        self, layers: Iterable[LoRALayer], slots: Sequence[str | None]
    ) -> dict[LoRALayer, LayerStack]:
        """The stacks of ``layers`` that hold at least one of ``slots`` (a plan's adapters)."""
        wanted = set(slots[1:])
        return {
            layer: self.stacks[layer]
            for layer in layers
            if layer in self.stacks and not wanted.isdisjoint(self._ranks[layer])
        }

    # ------------------------------------------------------------------ loading and eviction
    def load(self, name: str, factors: dict[str, LayerFactors] | StagedFactors) -> None:
        """Make adapter ``name`` resident from its per-module ``factors`` (module paths in
        ``model``, as :func:`loraq.io.peft_factors.layer_factors` gives them; or those staged by
        :func:`stage_factors`, which reload faster). Raises :class:`PoolError` (nothing changed)
        for a name already resident, a full pool, or factors that do not fit their module."""
        staged = factors if isinstance(factors, StagedFactors) else None
        source = None if staged is None else ("staged", staged.serial)
        plan = None if staged is None or staged.records is None else self._plans.get(staged.layout)
        if plan is not None:
            self._check_room(name)
            layers, rows = plan
            slot, slot_count, writes = self._prepare(dict(zip(layers, staged.factors.values())))
            self._commit(name, slot, slot_count, writes, source, (staged.records, rows))
            return
        self._load_checked(name, factors if staged is None else staged.factors, source)
        if staged is not None and staged.records is not None:
            layers = tuple(self._by_path[path] for path in staged.factors)
            self._plans[staged.layout] = (layers, self._rows_of(layers))

    def _load_checked(
        self, name: str, factors: dict[str, LayerFactors], source: Hashable = None
    ) -> None:
        """:meth:`load`, every factor checked against its module (``source``: see
        :meth:`_commit`)."""
        self._check_room(name)
        if not factors:
            raise PoolError(f"adapter {name!r} adapts no module")
        targets = {path: self._target(name, path, f) for path, f in factors.items()}
        bare = [path for path, t in targets.items() if not isinstance(t, LoRALayer)]
        # a wrapper freezes its base's parameters: give the flags back if the load fails
        flags = [(p, p.requires_grad) for path in bare for p in targets[path].parameters()]
        try:
            layers = {path: _as_lora_layer(t) for path, t in targets.items()}
            slot, rows, writes = self._prepare({layers[p]: f for p, f in factors.items()})
        except BaseException:
            for param, flag in flags:
                param.requires_grad_(flag)
            raise
        for path in bare:  # nothing can fail from here on
            set_submodule(self.model, path, layers[path])
            self.layout += 1
            self._plans.clear()
        self._by_path.update(layers)
        self._commit(name, slot, rows, writes, source)

    def load_from_model(self, name: str) -> None:
        """Make adapter ``name`` of the model's own layers resident too (its factors as the
        forward uses them: k-bit grids applied). Raises :class:`PoolError` as :meth:`load`."""
        self._check_room(name)
        plans = {}
        for path, layer in lora_layers(self.model):
            if name not in layer.r:
                continue
            view = layer.adapter_view(name)
            if layer.kind not in POOL_KINDS:
                raise _unservable(name, path, layer.kind)
            a, b = view.factors()
            plans[layer] = LayerFactors(a.detach(), b.detach(), view.scale, view.magnitude)
            self._by_path[path] = layer
        if not plans:
            raise PoolError(f"the model has no adapter {name!r} on LoRA layers")
        slot, rows, writes = self._prepare(plans)
        self._commit(name, slot, rows, writes)

    def evict(self, name: str) -> None:
        """Free ``name``'s slot (KeyError when it is not resident); a layer's stack narrows
        once the adapters left need at most half of its rank."""
        if name not in self._loads:
            raise KeyError(f"adapter {name!r} is not in the pool")
        slot = self.slots.index(name)
        written = {}
        with torch.no_grad():
            for layer, ranks in self._ranks.items():
                rank = ranks.pop(name, None)
                if rank is not None:
                    written[layer] = rank
                    self._shrink(layer)
        # no row reads a free slot: its rows are zeroed when it is taken again, and only those
        # the next adapter does not overwrite (most loads then zero nothing)
        self._stale[slot] = written
        slots = list(self.slots)
        slots[slot] = None
        while len(slots) > 1 and slots[-1] is None:
            slots.pop()  # the stacks keep their rows; only the names table shortens
        self.slots = tuple(slots)
        del self._loads[name]
        self.generation += 1

    # ------------------------------------------------------------------ internals
    def _check_room(self, name: str) -> None:
        if name in self._loads:
            raise PoolError(f"adapter {name!r} is already in the pool")
        if len(self._loads) >= self.capacity:
            raise PoolError(f"the adapter pool is full ({self.capacity} adapters); evict one first")

    def _target(self, name: str, path: str, factors: LayerFactors) -> nn.Module:
        """The module at ``path`` (a LoRA layer, or the base it will wrap), checked against
        ``factors``."""
        module = self._by_path.get(path)
        if module is None:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise PoolError(
                    f"adapter {name!r} adapts {path!r}, which the model does not have"
                ) from None
        base = module.base_layer if isinstance(module, LoRALayer) else module
        kind = layer_kind(base)
        if kind is None or kind.name not in POOL_KINDS:
            raise _unservable(name, path, type(base).__name__)
        in_f, out_f = kind.in_out(base)
        r = factors.a.shape[0]
        if tuple(factors.a.shape) != (r, in_f) or tuple(factors.b.shape) != (out_f, r) or r < 1:
            raise PoolError(
                f"adapter {name!r}: {path} takes A ({r}, {in_f}) and B ({out_f}, {r}), got A "
                f"{tuple(factors.a.shape)} and B {tuple(factors.b.shape)}"
            )
        if factors.magnitude is not None and not kind.supports_dora:
            raise PoolError(f"adapter {name!r}: {path} ({kind.name}) cannot take DoRA")
        saved = factors.base_weight
        if saved is not None and not (
            tuple(saved.shape) == tuple(base.weight.shape)
            and torch.equal(saved.to(base.weight.dtype), base.weight.detach())
        ):
            # other resident adapters run on the served weight: one adapter cannot replace it
            raise PoolError(
                f"adapter {name!r} carries its own base weight for {path}, which differs from "
                "the served model's (a resized vocabulary?); serve it merged or on its own"
            )
        return module

    def _free_slot(self) -> int:
        for i, n in enumerate(self.slots[1:], start=1):
            if n is None:
                return i
        return len(self.slots)

    def _prepare(self, plans: dict[LoRALayer, LayerFactors]) -> tuple[int, int, list]:
        """The slot, the stacks' slot count after the load and, per layer, ``(layer, stack,
        factors, DoRA scale)`` to write: what can fail (allocations: stacks that must grow are
        new tensors, every layer's when the slot count grows, as all stacks keep one row count;
        DoRA's norms) happens here, and nothing of the pool changes yet."""
        slot = self._free_slot()
        rows = self._rows
        while rows <= slot:
            rows = min(rows * 2, self.capacity + 1)
        writes = []
        with torch.no_grad():
            for layer, f in plans.items():
                dora = None if f.magnitude is None else _dora_scale(layer, f)
                stack = _fitted(self.stacks.get(layer), layer, rows, f.a.shape[0], dora is not None)
                writes.append((layer, stack, f, dora))
            if rows != self._rows:
                for layer, stack in self.stacks.items():
                    if layer not in plans:
                        writes.append((layer, _fitted(stack, layer, rows, 0, False), None, None))
        return slot, rows, writes

    def _commit(
        self,
        name: str,
        slot: int,
        rows: int,
        writes: list,
        source: Hashable = None,
        staged: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Take ``slot`` for ``name`` with ``writes`` (:meth:`_prepare`'s). ``source``: what
        :meth:`identity` reports for it (None: this load's own number). ``staged``: the staged
        adapter's records and their table rows, written in one compiled call (which also zeroes
        what the slot's last adapter left on those layers) where it can be."""
        stale = self._stale.pop(slot, {})
        new_ranks = {w[0]: w[2].a.shape[0] for w in writes if w[2] is not None}
        with torch.no_grad():
            for layer, stack, _, _ in writes:
                if self.stacks.get(layer) is not stack:
                    self.stacks[layer] = stack
                    self._table_stale = True
            placed = staged is not None and self._place(slot, *staged)
            for layer, left in stale.items():  # what the slot's last adapter left
                if placed and layer in new_ranks:
                    continue  # zeroed by the compiled write
                stack = self.stacks[layer]
                keep = new_ranks.get(layer, 0)
                if left > keep:
                    stack.a[slot, keep:left].zero_()
                    stack.b[slot, keep:left].zero_()
                if not keep:
                    stack.ranks[slot] = 0
                    if stack.dora is not None:
                        stack.dora[slot].fill_(1)
            # the slot's rows past each rank are zeros (fresh, or cleared just above)
            factored = [w for w in writes if w[2] is not None]
            one_call = [(f.a, f.b, st.a, st.b, st.ranks, slot, f.scale) for _, st, f, _ in factored]
            if not placed and not slot_kernels.write_slots(one_call):
                for _, stack, f, _ in factored:
                    rank = f.a.shape[0]
                    stack.a[slot, :rank].copy_(f.a)
                    torch.mul(f.b.t(), f.scale, out=stack.b[slot, :rank])
                    stack.ranks[slot] = rank
            for layer, stack, f, dora in factored:
                if stack.dora is not None:
                    stack.dora[slot].copy_(dora if dora is not None else 1)
                self._ranks.setdefault(layer, {})[name] = f.a.shape[0]
        slots = list(self.slots) + [None] * (slot + 1 - len(self.slots))
        slots[slot] = name
        self.slots = tuple(slots)
        self._loads[name] = next(_LOADS) if source is None else source
        self._rows = rows
        self.generation += 1

    def _rows_of(self, layers: Sequence[LoRALayer]) -> torch.Tensor:
        """``layers``' rows in the table of stacks (new layers get new rows)."""
        for layer in layers:
            if layer not in self._table_rows:
                self._table_rows[layer] = len(self._table_rows)
                self._table_stale = True
        return torch.tensor([self._table_rows[layer] for layer in layers], dtype=torch.int64)

    def _place(self, slot: int, records: torch.Tensor, rows: torch.Tensor) -> bool:
        """The compiled write of staged ``records`` into ``slot`` (see :meth:`_commit`); False
        (nothing written) where it cannot run."""
        if self._table_stale:
            order = sorted(self._table_rows, key=self._table_rows.__getitem__)
            stacks = [self.stacks.get(layer) for layer in order]
            table = [
                None if st is None else slot_kernels.stack_row(st.a, st.b, st.ranks)
                for st in stacks
            ]
            # a layer without float32 CPU stacks (or none yet): the checked path writes
            self._table = (
                None
                if None in table
                else torch.tensor(table, dtype=torch.int64).view(len(table), -1)
            )
            self._table_stale = False
        if self._table is None:
            return False
        return slot_kernels.place_slot(self._table, records, rows, slot)

    def _shrink(self, layer: LoRALayer) -> None:
        """Narrow ``layer``'s stack once its adapters need at most half of its rank."""
        stack = self.stacks[layer]
        need = max(self._ranks[layer].values(), default=1)
        if need * 2 <= stack.a.shape[1]:
            dora = None if stack.dora is None else stack.dora.clone()
            self.stacks[layer] = LayerStack(
                stack.a[:, :need].clone(), stack.b[:, :need].clone(), dora, stack.ranks.clone()
            )
            self._table_stale = True


def _unservable(name: str, path: str, what: str) -> PoolError:
    """The error for adapter ``name`` on module ``path`` (``what`` it is), a kind the pool does
    not run."""
    return PoolError(
        f"adapter {name!r} adapts {path} ({what}); the adapter pool runs adapters on "
        f"{', '.join(POOL_KINDS)} layers"
    )


def _as_lora_layer(module: nn.Module) -> LoRALayer:
    """``module`` if it is a LoRA layer, else a new one wrapping it (no adapter of its own)."""
    return module if isinstance(module, LoRALayer) else LoRALayer(module)


def _fitted(
    stack: LayerStack | None, layer: LoRALayer, rows: int, rank: int, dora: bool
) -> LayerStack:
    """``stack``, or a zero-filled copy of it grown to ``rows`` slots, ``rank`` (at least) and
    DoRA scales when ``dora``."""
    if stack is None:
        dtype, device = layer.adapter_dtype, layer.base_device
        a = torch.zeros(rows, rank, layer.in_features, dtype=dtype, device=device)
        b = torch.zeros(rows, rank, layer.out_features, dtype=dtype, device=device)
        scales = torch.ones(rows, layer.out_features, dtype=dtype, device=device) if dora else None
        return LayerStack(a, b, scales, torch.zeros(rows, dtype=torch.long, device=device))
    old_rows, r_max = stack.a.shape[0], stack.a.shape[1]
    if rows <= old_rows and rank <= r_max and (stack.dora is not None or not dora):
        return stack
    new_r = max(r_max, rank)
    a = stack.a.new_zeros(rows, new_r, stack.a.shape[2])
    b = stack.b.new_zeros(rows, new_r, stack.b.shape[2])
    a[:old_rows, :r_max] = stack.a
    b[:old_rows, :r_max] = stack.b
    scales = None
    if dora or stack.dora is not None:
        scales = stack.a.new_ones(rows, stack.b.shape[2])
        if stack.dora is not None:
            scales[:old_rows] = stack.dora
    ranks = stack.ranks.new_zeros(rows)
    ranks[:old_rows] = stack.ranks
    return LayerStack(a, b, scales, ranks)


def _dora_scale(layer: LoRALayer, factors: LayerFactors) -> torch.Tensor:
    """DoRA's column scale ``m / ||W + s B A||`` (rows of ``M``), as a mixed batch applies it."""
    dtype = layer.adapter_dtype
    a, b = factors.a.to(dtype), factors.b.to(dtype)
    norm = (layer.base_matrix().to(dtype) + factors.scale * (b @ a)).norm(dim=1)
    return factors.magnitude.to(dtype) / norm
