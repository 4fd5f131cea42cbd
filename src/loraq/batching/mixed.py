"""Mixed-adapter batches: every row of a batch runs through its own adapter (or none) in one pass.

A :class:`RowAdapters` plan names one adapter per row (``None`` for the bare base). One LoRA
layer then computes a batch of ``R`` rows with no Python loop over adapters or sub-batches:

=============  ==================================================================================
step           tensors
=============  ==================================================================================
base           ``base_layer(x)`` once for the whole batch: the frozen weight is shared by all rows
stack          ``A_s (slots, r_max, in)``, ``B_s (slots, r_max, out)``: every adapter's A and B,
               zero-padded to the largest rank, its scale folded into B; slot 0 is all zeros
               (:mod:`loraq.batching.stacks`)
select         ``A_s[row_slot]``, ``B_s[row_slot]``: one slice per row (``index_select``)
two thin bmm   ``delta = (x A_row^T) B_row`` of shape ``(R, T, out)``, added to the base output
               (or, when it is cheaper, :func:`use_concat`: all slots side by side and a mask;
               or, when every row uses one adapter, two plain matmuls with its slice)
DoRA           a per-slot column scale ``m / ||W + sBA||`` (1 for plain adapters and the base)
               turns the sum into ``scale * (base + delta)`` row by row
=============  ==================================================================================

The row -> slot selection is made once per forward pass, not once per layer: a
:class:`MixedBatch`, installed as every LoRA layer's ``row_hook`` by :func:`loraq.adapter_rows`
(and kept from one decode step to the next by the generation loop), maps the plan's rows to the
slots of the model's :class:`~loraq.batching.stacks.StackCache` once, and each layer then only
looks up its stack.
Without gradients the stacks come from that cache; with gradients (training) each layer stacks
the plan's adapters in the graph, and the selection's backward scatters each row's gradient into
its own adapter's slice only, so every adapter receives exactly the gradient it would get from
its rows trained alone. k-bit adapters enter through their fake-quantized weights, as in a
single-adapter forward. Convolutions are refused (a per-row kernel needs a grouped convolution
per adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..layers.lora import LoRALayer
from ..native import lean_layer
from .pool import AdapterPool
from .stacks import LayerStack, StackCache, check_layer, layer_versions, stack_layer


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses.

    Attributes:
        slots: the distinct adapter names, ``slots[0]`` is always ``None`` (the bare base).
        row_slot: ``(rows,)`` long tensor, the slot of each row.
    """

    slots: tuple[str | None, ...]
    row_slot: torch.Tensor
    # the one slot every row uses (None when rows differ), filled by from_names
    uniform: int | None = field(default=None, compare=False)

    @classmethod
    def from_names(cls, names: list[str | None] | tuple[str | None, ...]) -> RowAdapters:
        """Build a plan from one adapter name (or None) per row."""
        slots: list[str | None] = [None]
        index: list[int] = []
        for name in names:
            if name not in slots:
                slots.append(name)
            index.append(slots.index(name))
        uniform = index[0] if index and all(i == index[0] for i in index) else None
        return cls(tuple(slots), torch.tensor(index, dtype=torch.long), uniform)

    @property
    def rows(self) -> int:
        """Number of batch rows the plan covers."""
        return int(self.row_slot.shape[0])


def _row_dropout(layer: LoRALayer, plan: RowAdapters, x: torch.Tensor):
    """``x`` with each row's adapter dropout applied (training only; identity otherwise)."""
    if not layer.training:
        return x
    probs = [layer.adapter_view(n).dropout_p if n in layer.r else 0.0 for n in plan.slots]
    if not any(p > 0 for p in probs):
        return x
    p_row = torch.tensor(probs, dtype=x.dtype, device=x.device)[plan.row_slot.to(x.device)]
    p_row = p_row.view(-1, *([1] * (x.ndim - 1)))
    keep = (torch.rand_like(x) >= p_row).to(x.dtype)
    return x * keep / (1.0 - p_row)


def _embedding_hidden(layer: LoRALayer, x: torch.Tensor, a_s: torch.Tensor, row_slot: torch.Tensor):
    base = layer.base_layer
    if base.max_norm is not None:
        raise ValueError("mixed-adapter batches do not support nn.Embedding with max_norm")
    slots, r_max, vocab = a_s.shape
    table = a_s.transpose(1, 2).reshape(slots * vocab, r_max)
    flat_ids = row_slot.view(-1, *([1] * (x.ndim - 1))) * vocab + x
    hidden = F.embedding(flat_ids, table)
    if base.padding_idx is not None:
        # nn.Embedding's padding_idx only stops the gradient; the lookup itself is unchanged
        hidden = torch.where((x == base.padding_idx).unsqueeze(-1), hidden.detach(), hidden)
    return hidden


#: "auto" picks per call (:func:`use_concat`); "gather" or "concat" force one form (tests, benchmarks).
STRATEGY = "auto"
# A copied weight element costs about this many multiply-adds (memory-bound small copies).
_COPY_COST = 8


def use_concat(rows: int, tokens_per_row: int, slots: int, reused: bool = False) -> bool:
    """Whether the concatenated form beats the per-row gather for this batch.

    gather: each row copies its adapter's A and B (``rows * r * (in+out)`` elements) and then
    multiplies only them (``tokens * r * (in+out)``). concat: every token multiplies all slots'
    A and B stacked side by side (``tokens * slots * r * (in+out)``), then a mask keeps each
    row's own slot: no copy, but work grows with the number of adapters. ``reused``: the
    gathered copies serve the following forward passes too (a decode step: the same rows step
    after step, :meth:`MixedBatch.row_weights` keeps them), so their copy is not counted and
    the gather wins whenever there is more than one slot.
    """
    if STRATEGY != "auto":
        return STRATEGY == "concat"
    tokens = rows * tokens_per_row
    return tokens * slots <= tokens + (0 if reused else _COPY_COST * rows)


#: Most bytes of per-row adapter slices a :class:`MixedBatch` keeps between forward passes.
GATHER_CACHE_BYTES = 256 << 20

#: What :meth:`MixedBatch.select` hands a layer: its stack, each row's slot (on the layer's
#: device) and the one slot all rows share (None when they differ).
Selection = tuple[LayerStack, torch.Tensor, "int | None"]


class MixedBatch:
    """A plan's row -> adapter selection, made once and shared by every LoRA layer of a model.

    It is the :class:`~loraq.layers.adapter_view.RowHook` that :func:`loraq.adapter_rows`
    installs on each layer. ``find_layers()`` lists the model's LoRA layers; it is called again
    whenever ``model_key()`` (the model's adapter names, say) or a known layer's
    ``adapter_version`` changes (new adapters may wrap new layers). ``cache`` holds the
    stacked weights: the model's own adapters (a :class:`~loraq.batching.stacks.StackCache`)
    or a server's resident ones (an :class:`~loraq.batching.pool.AdapterPool`).
    ``check_versions``: whether the next forward re-reads every adapter tensor's version
    counter to catch in-place edits (a decode loop turns it off after its first step with a
    plan, since nothing edits adapters between its steps; structural changes are always seen).
    """

    def __init__(
        self,
        plan: RowAdapters,
        cache: StackCache | AdapterPool,
        find_layers: Callable[[], list[LoRALayer]],
        layers: list[LoRALayer] | None = None,
        *,
        model_key: Callable[[], object] = lambda: None,
        check_versions: bool = True,
    ) -> None:
        self.plan = plan
        self.cache = cache
        self.check_versions = check_versions
        self._find_layers = find_layers
        self._model_key = model_key
        self._layers = find_layers() if layers is None else layers
        self._versions = layer_versions(self._layers)
        self._layers_key = (model_key(), self._versions)
        self._ready = False
        self._generation = -1
        self._active: dict[LoRALayer, LayerStack] = {}
        self._row_slot = plan.row_slot
        self._uniform: int | None = None
        self._rows_on: dict[torch.device, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._gathered: dict[LoRALayer, tuple] = {}
        self._plan_stacks: dict[LoRALayer, tuple] = {}
        self._to_cache = torch.zeros(0, dtype=torch.long)
        self._gathered_bytes = 0

    @classmethod
    def alone(cls, layer: LoRALayer, plan: RowAdapters) -> MixedBatch:
        """A batch over one lone layer, with its own cache (reuse it to reuse the stacks)."""
        return cls(plan, StackCache(), lambda: [layer])

    def __call__(
        self, layer: LoRALayer, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The :class:`~loraq.layers.adapter_view.RowHook` call: :func:`mixed_forward`."""
        return mixed_forward(layer, self, x, *args, **kwargs)

    def begin(self) -> list[LoRALayer]:
        """Start a forward pass and return the model's LoRA layers (found again after a change
        of the adapter set); the first layer called then re-checks the stacked weights."""
        self._versions = layer_versions(self._layers)
        if (self._model_key(), self._versions) != self._layers_key:
            self._layers = self._find_layers()
            self._versions = layer_versions(self._layers)
            self._layers_key = (self._model_key(), self._versions)
        self._ready = False
        return self._layers

    def select(self, layer: LoRALayer, device: torch.device) -> Selection | None:
        """``layer``'s stack and row slots, or None when it has none of the plan's adapters."""
        if torch.is_grad_enabled() and self.cache.builds_in_graph:
            # training: stacks built in the autograd graph
            if not check_layer(layer, self.plan.slots):
                return None
            stack = stack_layer(layer, self.plan.slots, device)
            return stack, self.plan.row_slot.to(device), self.plan.uniform
        if not self._ready:
            self._prepare()
        stack = self._active.get(layer)
        if stack is None:
            return None
        rows = self._rows_on.get(device)
        if rows is None:
            rows = self._rows_on[device] = self._row_slot.to(device)
        return stack, rows, self._uniform

    def _prepare(self) -> None:
        layers = self._layers
        self.cache.refresh(layers, self._versions, check_versions=self.check_versions)
        self._ready = True
        if self._generation == self.cache.generation:
            return
        index = self.cache.slot_index()
        missing = [n for n in self.plan.slots[1:] if n not in index]
        if missing:
            raise ValueError(f"adapters {missing} are no longer in the model")
        to_cache = torch.tensor([index[n] for n in self.plan.slots], dtype=torch.long)
        self._row_slot = to_cache[self.plan.row_slot]
        plan_uniform = self.plan.uniform
        self._uniform = None if plan_uniform is None else int(to_cache[plan_uniform])
        self._active = self.cache.active_stacks(layers, self.plan.slots)
        self._to_cache = to_cache
        self._rows_on, self._masks, self._gathered, self._plan_stacks = {}, {}, {}, {}
        self._gathered_bytes = 0
        self._generation = self.cache.generation

    def row_weights(self, layer: LoRALayer, stack: LayerStack, rows: torch.Tensor) -> tuple:
        """``(A, B, DoRA scale or None)`` of each row: the stack's slices picked by ``rows``.

        Without gradients they are kept (within :data:`GATHER_CACHE_BYTES`) for the next
        forward with the same rows: a decode step then reads them instead of copying again.
        """
        hit = None if torch.is_grad_enabled() else self._gathered.get(layer)
        if hit is not None:
            return hit
        dora = None if stack.dora is None else stack.dora.index_select(0, rows)
        hit = (stack.a.index_select(0, rows), stack.b.index_select(0, rows), dora)
        if not torch.is_grad_enabled():
            size = sum(t.numel() * t.element_size() for t in hit if t is not None)
            if self._gathered_bytes + size <= GATHER_CACHE_BYTES:
                self._gathered[layer] = hit
                self._gathered_bytes += size
        return hit

    def plan_stack(self, layer: LoRALayer, stack: LayerStack, rows: torch.Tensor) -> tuple:
        """``(A, B, rows)`` over the plan's slots only: ``stack`` restricted to them (in plan
        order) and each row's plan slot. With gradients ``stack`` is already the plan's; without,
        it holds every adapter of the model, and the restriction is kept for the next forward
        (the concatenated form then multiplies the plan's few adapters, not all of them, and
        not the bare base's zero slot when no row runs without an adapter)."""
        if torch.is_grad_enabled():
            return stack.a, stack.b, rows
        hit = self._plan_stacks.get(layer)
        if hit is None:
            index = self._to_cache.to(stack.a.device)
            plan_rows = self.plan.row_slot.to(rows.device)
            if not bool((self.plan.row_slot == 0).any()):
                # no row runs the bare base: its all-zero slot would only add work
                index, plan_rows = index[1:], plan_rows - 1
            hit = (stack.a.index_select(0, index), stack.b.index_select(0, index), plan_rows)
            self._plan_stacks[layer] = hit
        return hit

    def slot_mask(self, rows: torch.Tensor, r_max: int, slots: int, dtype) -> torch.Tensor:
        """``(R, slots * r_max)``: 1 where a column of the concatenated form is the row's."""
        key = (rows.device, dtype, r_max, slots, torch.is_grad_enabled())
        mask = self._masks.get(key)
        if mask is None:
            column = torch.arange(slots, device=rows.device).repeat_interleave(r_max)
            mask = self._masks[key] = (column[None, :] == rows[:, None]).to(dtype)
        return mask


def _linear_delta(batch: MixedBatch, layer, x_in, stack: LayerStack, rows, uniform, out=None):
    """``(R, T, out)`` adapter outputs of a linear-like layer for inputs ``x_in (R, T, in)``.

    With ``out`` (the base output as ``(R, T, out)``, no gradients) the outputs are added into
    it in place instead: no fresh output-sized tensors, whose allocation costs page faults.
    """
    r_max, in_f = stack.a.shape[1:]
    if uniform is not None and STRATEGY == "auto":
        hidden, b = torch.matmul(x_in, stack.a[uniform].t()), stack.b[uniform]
    else:
        slots = len(batch.plan.slots)
        # one token per row without gradients: a decode step, whose rows come back next step
        reused = x_in.shape[1] == 1 and not torch.is_grad_enabled()
        if use_concat(x_in.shape[0], x_in.shape[1], slots, reused):
            a_s, b_s, plan_rows = batch.plan_stack(layer, stack, rows)
            slots = a_s.shape[0]
            own = batch.slot_mask(plan_rows, r_max, slots, x_in.dtype)
            hidden = torch.matmul(x_in, a_s.reshape(slots * r_max, in_f).t()) * own[:, None]
            b = b_s.reshape(slots * r_max, -1)  # hidden: (R, T, slots * r)
        else:
            if out is not None and _compiled_rows(x_in, out, stack, rows):
                return out
            a_rows, b_rows, _ = batch.row_weights(layer, stack, rows)
            hidden = torch.bmm(x_in, a_rows.transpose(1, 2))
            if out is None:
                return torch.bmm(hidden, b_rows)
            return out.baddbmm_(hidden, b_rows)
    if out is None:
        return torch.matmul(hidden, b)
    flat = out.view(-1, out.shape[-1])
    flat.addmm_(hidden.reshape(flat.shape[0], -1), b)
    return out


def _compiled_rows(x_in: torch.Tensor, out: torch.Tensor, stack: LayerStack, rows) -> bool:
    """Add each row's delta into ``out`` with the compiled kernel (no per-row copies of the
    stacks, no products with the zero rows past a slot's rank); False when it does not apply
    (not float32 on CPU, or no compiler), and nothing was done."""
    if not (
        x_in.device.type == "cpu"
        and x_in.dtype == out.dtype == stack.a.dtype == torch.float32
        and stack.a.is_contiguous()
        and stack.b.is_contiguous()
        and lean_layer.available()
    ):
        return False
    lean_layer.lora_rows(x_in.contiguous(), out, stack.a, stack.b, rows, stack.ranks)
    return True


def mixed_forward(
    layer: LoRALayer, batch: MixedBatch, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """The output of ``layer`` (a ``LoRALayer``) with each row of ``x`` using its plan adapter."""
    plan = batch.plan
    rows = x.shape[0] if x.ndim > 0 else 0
    if rows != plan.rows:
        raise ValueError(
            f"mixed-adapter batch: the input has {rows} rows (dim 0 of shape {tuple(x.shape)}) "
            f"but {plan.rows} adapter names were given, one per row"
        )
    selection = batch.select(layer, x.device)
    result = layer.base_layer(x, *args, **kwargs)
    if selection is None or selection[2] == 0:  # no plan adapter here, or every row is base
        return result
    stack, row_slot, uniform = selection
    dtype = stack.a.dtype
    if layer.kind == "embedding":
        hidden = _embedding_hidden(layer, x, stack.a, row_slot).reshape(rows, -1, stack.a.shape[1])
        delta = torch.bmm(hidden, batch.row_weights(layer, stack, row_slot)[1])
    else:
        x_in = _row_dropout(layer, plan, x.to(dtype)).reshape(rows, -1, x.shape[-1])
        in_place = (
            stack.dora is None
            and result.dtype == dtype
            and result.is_contiguous()
            and not torch.is_grad_enabled()
        )
        if in_place:
            out = result.view(rows, x_in.shape[1], -1)
            _linear_delta(batch, layer, x_in, stack, row_slot, uniform, out)
            return result
        delta = _linear_delta(batch, layer, x_in, stack, row_slot, uniform)
    delta = delta.reshape(result.shape)
    if stack.dora is None:
        return result + delta.to(result.dtype)
    # DoRA rows: scale * (base without bias + delta) + bias; plain rows have scale 1.
    if uniform is not None:
        scale = stack.dora[uniform]
    else:
        picked = (
            stack.dora.index_select(0, row_slot)
            if torch.is_grad_enabled()
            else batch.row_weights(layer, stack, row_slot)[2]
        )
        scale = picked.view(rows, *([1] * (result.ndim - 2)), -1)
    base_nb = result.to(dtype)
    if layer.bias is not None:
        base_nb = base_nb - layer.bias.to(dtype)
    extra = (scale - 1) * base_nb + scale * delta
    return result + extra.to(result.dtype)
