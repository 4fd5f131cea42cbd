"""An adapter file's tensors grouped by the module they adapt, for code that keeps adapters
outside the model's own layers (the serving pool, :mod:`loraq.batching.pool`).

:func:`layer_factors` turns what :func:`~loraq.io.peft_format.read_adapter` returned (config and
tensors under PEFT's keys) into one :class:`~loraq.layers.adapter_view.LayerFactors` per adapted
module, checked on its own (the pool checks them against the model):

==============================================  ================================================
on disk (after ``base_model.model.``)           factors
==============================================  ================================================
``<m>.lora_A.weight`` / ``<m>.lora_B.weight``   ``a (r, in)``, ``b (out, r)`` of a linear layer
``<m>.lora_embedding_A`` / ``..._B``            the same for an embedding (``in``: vocabulary)
``<m>.lora_magnitude_vector``                   DoRA's ``magnitude (out,)``, with ``use_dora``
``<m>.base_layer.weight``                       the base weight the adapter was trained on, as
                                                PEFT saves adapted embeddings' (``base_weight``)
==============================================  ================================================

The scale is the config's (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA). Refused, with a
one-line :class:`~loraq.io.safe.FormatError` naming the key: adapters on parameters
(``target_parameters``), ``modules_to_save`` copies, convolution factors, any other tensor,
a module with only one factor, and ranks that disagree with the config.
"""

from __future__ import annotations

import functools

import torch

from ..core.naming import split_disk_key
from ..layers.adapter_view import LayerFactors
from ..model.config import LoraConfig
from .peft_format import PREFIX
from .safe import FormatError

#: Which store holds A and which B, for module factors and for embedding factors.
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
_MAGNITUDE = "lora_magnitude_vector"
_BASE_WEIGHT = ".base_layer.weight"


class ParameterAdapterError(FormatError):
    """The adapter adapts parameters (``target_parameters``), which per-row serving cannot run."""


def layer_factors(
    config: LoraConfig, tensors: dict[str, torch.Tensor], source: str
) -> dict[str, LayerFactors]:
    """``{module path: LayerFactors}`` of an adapter file's ``tensors`` (see the module doc)."""
    if config.target_parameters:
        raise ParameterAdapterError(
            f"{source} has adapters on a parameter (target_parameters: "
            f"{sorted(config.target_parameters)}); mixed-adapter batches support LoRA layers only"
        )
    if config.modules_to_save:
        raise FormatError(
            f"{source} has modules_to_save {sorted(config.modules_to_save)}; mixed-adapter "
            "batches support LoRA layers only (serve that adapter merged, or on its own)"
        )
    stores: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        split = _module_and_store(key)
        if split is None:
            raise FormatError(
                f"{source}: tensor {key!r} is not a LoRA factor or DoRA magnitude; only those "
                "are served from the adapter pool"
            )
        module, store = split
        stores.setdefault(module, {})[store] = (key, tensor)
    return {module: _one_layer(config, module, held, source) for module, held in stores.items()}


@functools.lru_cache(maxsize=1 << 14)
def _module_and_store(key: str) -> tuple[str, str] | None:
    """``(module path, store)`` of an on-disk key, or None for any other tensor. Cached: a
    server reads the same keys from every adapter of one target set."""
    split = split_disk_key(key[len(PREFIX) :]) if key.startswith(PREFIX) else None
    if split is None and key.endswith(_BASE_WEIGHT) and key.startswith(PREFIX):
        split = (key[len(PREFIX) : -len(_BASE_WEIGHT)], _BASE_WEIGHT)
    return split


def _one_layer(
    config: LoraConfig, module: str, held: dict[str, tuple[str, torch.Tensor]], source: str
) -> LayerFactors:
    pair = next((p for p in _PAIRS if p[0] in held or p[1] in held), None)
    if pair is None or pair[0] not in held or pair[1] not in held:
        present = sorted(key for key, _ in held.values())
        raise FormatError(f"{source}: module {module!r} needs both LoRA factors, found {present}")
    (a_key, a), (b_key, b) = held[pair[0]], held[pair[1]]
    for key, tensor in ((a_key, a), (b_key, b)):
        if tensor.ndim != 2:
            raise FormatError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}; only 2-D factors "
                "(linear and embedding layers) are served from the adapter pool"
            )
    if a.shape[0] != config.r or b.shape[1] != config.r:
        raise FormatError(
            f"{source}: {a_key!r} {tuple(a.shape)} and {b_key!r} {tuple(b.shape)} do not have "
            f"the config's rank r={config.r}"
        )
    magnitude = held.get(_MAGNITUDE)
    if (magnitude is not None) != config.use_dora:
        key = magnitude[0] if magnitude is not None else f"{PREFIX}{module}.{_MAGNITUDE}"
        state = "holds" if magnitude is not None else "lacks"
        raise FormatError(f"{source} {state} {key!r} but use_dora is {config.use_dora}")
    if magnitude is not None and tuple(magnitude[1].shape) != (b.shape[0],):
        raise FormatError(
            f"{source}: tensor {magnitude[0]!r} has shape {tuple(magnitude[1].shape)}, expected "
            f"({b.shape[0]},)"
        )
    base = held.get(_BASE_WEIGHT)
    return LayerFactors(
        a,
        b,
        config.scaling,
        None if magnitude is None else magnitude[1],
        None if base is None else base[1],
    )
