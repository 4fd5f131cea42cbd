"""Per-row adapters for any forward pass: ``with loraq.adapter_rows(model, names): model(x)``.

Inside the context every LoRA layer of ``model`` computes row ``i`` of its input with adapter
``names[i]`` (``None``: the bare base), all rows in one pass (see :mod:`loraq.batching.mixed`).
Works for inference and training: each adapter's gradient comes from its own rows only.
The context installs a :class:`~loraq.batching.mixed.MixedBatch` as each layer's ``row_hook``
(the contract of :mod:`loraq.layers.adapter_view`) and clears it on exit;
:func:`layer_rows` does the same for one standalone ``LoRALayer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from ..layers.lora import LoRALayer
from ..model.surgery import adapter_names, config_of, lora_layers, param_lora_layers
from .mixed import MixedBatch, RowAdapters
from .pool import AdapterPool
from .stacks import StackCache

# where a model keeps its stacked adapter weights for mixed batches (built on first use)
_STACKS_ATTR = "_loraq_mixed_stacks"


def lora_layer_list(model: nn.Module) -> list[LoRALayer]:
    """Every LoRA layer of ``model`` (a walk over its modules)."""
    return [layer for _, layer in lora_layers(model)]


def refuse_param_lora(model: nn.Module) -> None:
    """Raise a one-line ``ValueError`` when ``model`` has adapters on parameters.

    A :class:`~loraq.layers.param_lora.ParamLoRA` (``target_parameters``, MoE expert stacks)
    swaps the whole parameter for one adapter per forward pass, so it cannot give each row its
    own adapter: in a mixed batch every row would silently run the active one.
    """
    for name, layer in param_lora_layers(model):
        if layer.r:
            raise ValueError(
                f"{name}.{layer.parameter_name} has adapters on a parameter "
                f"(target_parameters: {sorted(layer.r)}); mixed-adapter batches support LoRA "
                "layers only (run such adapters one at a time, without adapter_names)"
            )


def validate_row_names(model: nn.Module, names: Sequence[str | None]) -> list[str | None]:
    """``names`` as a list, checked against the model's adapters (a clear error otherwise).

    Models with adapters on parameters are refused (:func:`refuse_param_lora`).
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name (or None) per row, got {names!r}"
        )
    refuse_param_lora(model)
    known = adapter_names(model)
    checked: set[str] = set()
    for i, name in enumerate(names):
        if name is None or name in checked:
            continue
        if not isinstance(name, str):
            raise TypeError(f"adapter_names[{i}] must be a string or None, got {name!r}")
        if name not in known:
            raise ValueError(
                f"adapter_names[{i}]={name!r} is not an adapter of the model; adapters: {known}"
            )
        checked.add(name)
        if config_of(model, name).modules_to_save:
            raise ValueError(
                f"adapter {name!r} has modules_to_save; mixed-adapter batches support LoRA "
                "layers only (run that adapter in its own batch)"
            )
    return list(names)


def mixed_batch(
    model: nn.Module,
    names: Sequence[str | None] | RowAdapters,
    layers: list[LoRALayer] | None = None,
    *,
    pool: AdapterPool | None = None,
) -> MixedBatch:
    """A :class:`~loraq.batching.mixed.MixedBatch` for ``model``: the plan, checked, and the
    model's stacked-weight cache. Reuse it across forward passes with the same rows (a decode
    loop) so that the row -> adapter selection is made once; pass it to :func:`adapter_rows`.

    With ``pool`` (an :class:`~loraq.batching.pool.AdapterPool` of ``model``) the rows run the
    pool's resident adapters instead of the model's own."""
    if pool is not None:
        return _pool_batch(pool, names)
    if isinstance(names, RowAdapters):
        plan = names
        validate_row_names(model, list(plan.slots[1:]))
    else:
        plan = RowAdapters.from_names(validate_row_names(model, names))
    cache = model.__dict__.get(_STACKS_ATTR)
    if cache is None:
        cache = model.__dict__[_STACKS_ATTR] = StackCache()
    return MixedBatch(
        plan,
        cache,
        lambda: lora_layer_list(model),
        layers,
        model_key=lambda: tuple(adapter_names(model)),
    )


def _pool_batch(pool: AdapterPool, names: Sequence[str | None] | RowAdapters) -> MixedBatch:
    plan = names if isinstance(names, RowAdapters) else None
    listed = list(plan.slots[1:]) if plan is not None else names
    if isinstance(listed, str) or not isinstance(listed, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name (or None) per row, got {names!r}"
        )
    for i, name in enumerate(listed):
        if name is not None and name not in pool:
            raise ValueError(
                f"adapter_names[{i}]={name!r} is not resident in the adapter pool; resident: "
                f"{pool.names()}"
            )
    if plan is None:
        plan = RowAdapters.from_names(list(listed))
    return MixedBatch(plan, pool, lambda: pool.layers, model_key=lambda: pool.layout)


@contextlib.contextmanager
def _installed(batch: MixedBatch) -> Iterator[RowAdapters]:
    """``batch`` as the ``row_hook`` of each of its layers for the duration of the context."""
    layers = batch.begin()
    if any(layer.row_hook is not None for layer in layers):
        raise RuntimeError("adapter_rows() is already active on this model; contexts do not nest")
    for layer in layers:
        layer.set_row_hook(batch)
    try:
        yield batch.plan
    finally:
        for layer in layers:
            layer.set_row_hook(None)


@contextlib.contextmanager
def adapter_rows(
    model: nn.Module,
    names: Sequence[str | None] | RowAdapters | MixedBatch,
    layers: list[LoRALayer] | None = None,
) -> Iterator[RowAdapters]:
    """Context manager: row ``i`` of every batch passed to ``model`` uses adapter ``names[i]``.

    The batch dimension (dim 0 of each adapted layer's input) must have ``len(names)`` rows.
    ``None`` rows see the base model. Contexts do not nest on the same model. ``names`` may
    also be a :class:`~loraq.batching.mixed.RowAdapters` plan or a :func:`mixed_batch` reused
    across calls (a decode loop: the selection and stacked weights are then made once).
    ``layers`` may pass the model's LoRA layers (:func:`lora_layer_list`) to skip walking the
    module tree.
    """
    batch = names if isinstance(names, MixedBatch) else mixed_batch(model, names, layers)
    with _installed(batch) as plan:
        yield plan


@contextlib.contextmanager
def layer_rows(
    layer: LoRALayer, names: Sequence[str | None] | RowAdapters | MixedBatch
) -> Iterator[RowAdapters]:
    """Context manager: :func:`adapter_rows` for one ``LoRALayer`` used on its own (no model, no
    saved configs). ``names`` may be a ``MixedBatch.alone(layer, plan)`` reused across calls
    (its stacked weights are then built once)."""
    if isinstance(names, MixedBatch):
        batch = names
    else:
        plan = names if isinstance(names, RowAdapters) else RowAdapters.from_names(list(names))
        batch = MixedBatch.alone(layer, plan)
    with _installed(batch) as plan:
        yield plan
