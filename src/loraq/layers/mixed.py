"""Mixed-adapter batches: every row of a batch runs through its own adapter (or none) in one pass.

A :class:`RowAdapters` plan names one adapter per row (``None`` for the bare base). The slots are
the plan's distinct adapters, slot 0 being "no adapter". One LoRA layer then computes a batch of
``R`` rows with no Python loop over adapters or sub-batches:

=============  ==================================================================================
step           tensors
=============  ==================================================================================
base           ``base_layer(x)`` once for the whole batch: the frozen weight is shared by all rows
stack          ``A_s (slots, r_max, in)``, ``B_s (slots, out, r_max)``: each adapter's A and B,
               zero-padded to the largest rank, its scale folded into B; slot 0 is all zeros
select         ``A_s[row_slot]``, ``B_s[row_slot]``: one slice per row (an index, not a copy loop)
two thin bmm   ``delta = (x A_row^T) B_row^T`` of shape ``(R, T, out)``, added to the base output
               (or, when it is cheaper, :func:`use_concat`: all slots side by side and a mask)
DoRA           a per-slot column scale ``m / ||W + sBA||`` (1 for plain adapters and the base)
               turns the sum into ``scale * (base + delta)`` row by row
=============  ==================================================================================

In training the selection's backward scatters each row's gradient into its own adapter's slice
only, so every adapter receives exactly the gradient it would get from its rows trained alone.
k-bit adapters enter through their fake-quantized weights, as in a single-adapter forward.
Convolutions are refused (a per-row kernel needs a grouped convolution per adapter).

The stacked tensors are cached on the layer while gradients are off (serving): the cache key holds
the adapter tensors and their in-place version counters, so an edited or replaced adapter re-stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

_CACHE_ATTR = "_mixed_stack_cache"


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses.

    Attributes:
        slots: the distinct adapter names, ``slots[0]`` is always ``None`` (the bare base).
        row_slot: ``(rows,)`` long tensor, the slot of each row.
    """

    slots: tuple[str | None, ...]
    row_slot: torch.Tensor
    # per-plan derived tensors (row masks of the concatenated form), built on first use
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, names: list[str | None] | tuple[str | None, ...]) -> RowAdapters:
        """Build a plan from one adapter name (or None) per row."""
        slots: list[str | None] = [None]
        index: list[int] = []
        for name in names:
            if name not in slots:
                slots.append(name)
            index.append(slots.index(name))
        return cls(tuple(slots), torch.tensor(index, dtype=torch.long))

    def slot_mask(self, r_max: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(rows, slots * r_max)``: 1 where a column of the concatenated form is the row's."""
        key = (r_max, device, dtype)
        if key not in self._derived:
            column_slot = torch.arange(len(self.slots), device=device).repeat_interleave(r_max)
            row_slot = self.row_slot.to(device)
            self._derived[key] = (column_slot[None, :] == row_slot[:, None]).to(dtype)
        return self._derived[key]

    @property
    def rows(self) -> int:
        """Number of batch rows the plan covers."""
        return int(self.row_slot.shape[0])


def _check_supported(layer: Any, plan: RowAdapters) -> list[str]:
    """Names of the plan's adapters present on ``layer``; raises for what mixing cannot do."""
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
    present = [n for n in plan.slots[1:] if n in layer.r]
    if layer.training:
        for name in present:
            if layer.use_dora[name] and layer._dropout_p(name) > 0:
                raise ValueError(
                    f"mixed-adapter training does not support DoRA adapter {name!r} with dropout "
                    f"{layer._dropout_p(name)}; set its dropout to 0 or train it on its own"
                )
    return present


def _stack(layer: Any, plan: RowAdapters, present: list[str], device: torch.device):
    """``(A_s, B_s, dora_scale or None)`` for the plan's slots (see the module table)."""
    dtype = layer._adapter_dtype()
    r_max = max(layer.r[n] for n in present)
    in_f, out_f = layer._in_out()
    a_rows, b_rows, dora = [], [], []
    any_dora = any(layer.use_dora[n] for n in present)
    for name in plan.slots:
        if name not in present:
            a_rows.append(torch.zeros(r_max, in_f, dtype=dtype, device=device))
            b_rows.append(torch.zeros(out_f, r_max, dtype=dtype, device=device))
            dora.append(torch.ones(out_f, dtype=dtype, device=device))
            continue
        a, b = layer._a_b_matrices(name)
        pad = r_max - layer.r[name]
        a_rows.append(F.pad(a.to(dtype), (0, 0, 0, pad)))
        b_rows.append(F.pad(b.to(dtype) * layer.scaling[name], (0, pad)))
        if layer.use_dora[name]:
            with torch.no_grad():
                norm = (layer.base_matrix().to(dtype) + layer.delta_matrix(name)).norm(dim=1)
            dora.append(layer.lora_magnitude_vector[name] / norm)
        else:
            dora.append(torch.ones(out_f, dtype=dtype, device=device))
    stacked_dora = torch.stack(dora) if any_dora else None
    a_s, b_s = torch.stack(a_rows), torch.stack(b_rows)
    # B of every slot side by side, (slots * r_max, out), for the concatenated form
    b_cat = b_s.permute(0, 2, 1).reshape(len(plan.slots) * r_max, out_f)
    return a_s, b_s, stacked_dora, b_cat


def _cache_key(layer: Any, plan: RowAdapters, present: list[str]) -> tuple:
    # The key holds the tensors themselves (compared by identity), so a deleted adapter's
    # tensors stay alive while cached and a new one can never reuse their id(). Read straight
    # from the module dicts: this runs for every layer at every decode step.
    if layer.kind == "embedding":
        tensors = [t for name in present for t in layer._a_b_params(name)]
    else:
        a_modules, b_modules = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
        tensors = []
        for name in present:
            tensors.append(a_modules[name]._parameters["weight"])
            tensors.append(b_modules[name]._parameters["weight"])
    magnitudes = layer._modules["lora_magnitude_vector"]
    tensors += [magnitudes[name] for name in present if layer.use_dora[name]]
    return plan.slots, tensors, [t._version for t in tensors]


def _same_key(old: tuple, new: tuple) -> bool:
    return (
        old[0] == new[0]
        and len(old[1]) == len(new[1])
        and all(a is b for a, b in zip(old[1], new[1]))
        and old[2] == new[2]
    )


def _stacked(layer: Any, plan: RowAdapters, present: list[str], device: torch.device):
    if torch.is_grad_enabled():
        return _stack(layer, plan, present, device)
    key = _cache_key(layer, plan, present)
    cached = layer.__dict__.get(_CACHE_ATTR)
    if cached is None or not _same_key(cached[0], key):
        cached = (key, _stack(layer, plan, present, device))
        layer.__dict__[_CACHE_ATTR] = cached
    return cached[1]


def _row_dropout(layer: Any, plan: RowAdapters, x: torch.Tensor, row_slot: torch.Tensor):
    """``x`` with each row's adapter dropout applied (training only; identity otherwise)."""
    if not layer.training:
        return x
    probs = [layer._dropout_p(n) if n in layer.r else 0.0 for n in plan.slots]
    if not any(p > 0 for p in probs):
        return x
    p_row = torch.tensor(probs, dtype=x.dtype, device=x.device)[row_slot]
    p_row = p_row.view(-1, *([1] * (x.ndim - 1)))
    keep = (torch.rand_like(x) >= p_row).to(x.dtype)
    return x * keep / (1.0 - p_row)


def _embedding_hidden(layer: Any, x: torch.Tensor, a_s: torch.Tensor, row_slot: torch.Tensor):
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


def use_concat(rows: int, tokens_per_row: int, slots: int) -> bool:
    """Whether the concatenated form beats the per-row gather for this batch.

    gather: each row copies its adapter's A and B (``rows * r * (in+out)`` elements) and then
    multiplies only them (``tokens * r * (in+out)``). concat: every token multiplies all slots'
    A and B stacked side by side (``tokens * slots * r * (in+out)``), then a mask keeps each
    row's own slot: no copy, but work grows with the number of adapters. Decoding (one token per
    row) over a few adapters favours concat; long prompts or many adapters favour gather.
    """
    if STRATEGY != "auto":
        return STRATEGY == "concat"
    tokens = rows * tokens_per_row
    return tokens * slots <= tokens + _COPY_COST * rows


def _concat_delta(x_in, a_s, b_cat, own) -> torch.Tensor:
    """``(R, T, out)`` adapter outputs via all slots side by side and the per-row slot mask."""
    slots, r_max, in_f = a_s.shape
    hidden = torch.matmul(x_in, a_s.reshape(slots * r_max, in_f).t())  # (R, T, slots*r)
    return torch.matmul(hidden * own[:, None, :], b_cat)


def mixed_forward(
    layer: Any, plan: RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """The output of ``layer`` (a ``LoRALayer``) with each row of ``x`` using its plan adapter."""
    rows = x.shape[0] if x.ndim > 0 else 0
    if rows != plan.rows:
        raise ValueError(
            f"mixed-adapter batch: the input has {rows} rows (dim 0 of shape {tuple(x.shape)}) "
            f"but {plan.rows} adapter names were given, one per row"
        )
    present = _check_supported(layer, plan)
    result = layer.base_layer(x, *args, **kwargs)
    if not present:
        return result
    device = result.device
    a_s, b_s, dora, b_cat = _stacked(layer, plan, present, device)
    row_slot = plan.row_slot.to(device)
    dtype = a_s.dtype
    if layer.kind == "embedding":
        hidden = _embedding_hidden(layer, x, a_s, row_slot).reshape(rows, -1, a_s.shape[1])
        delta = torch.bmm(hidden, b_s[row_slot].transpose(1, 2))
    else:
        x_in = _row_dropout(layer, plan, x.to(dtype), row_slot).reshape(rows, -1, x.shape[-1])
        if use_concat(rows, x_in.shape[1], a_s.shape[0]):
            own = plan.slot_mask(a_s.shape[1], device, dtype)
            delta = _concat_delta(x_in, a_s, b_cat, own)
        else:
            hidden = torch.bmm(x_in, a_s[row_slot].transpose(1, 2))
            delta = torch.bmm(hidden, b_s[row_slot].transpose(1, 2))
    delta = delta.reshape(result.shape)
    if dora is None:
        return result + delta.to(result.dtype)
    # DoRA rows: scale * (base without bias + delta) + bias; plain rows have scale 1.
    scale = dora[row_slot].view(rows, *([1] * (result.ndim - 2)), -1)
    base_nb = result.to(dtype)
    if layer.bias is not None:
        base_nb = base_nb - layer.bias.to(dtype)
    extra = (scale - 1) * base_nb + scale * delta
    return result + extra.to(result.dtype)
