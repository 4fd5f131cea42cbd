"""The stacked-adapter cache of mixed batches is rebuilt incrementally and never goes stale."""

from __future__ import annotations

import pytest
import torch

import loraq
from loraq.batching.rows import lora_layer_list
from loraq.batching.stacks import StackCache, layer_versions, stack_layer
from tiny_lm import randomize_adapters, tiny_causal_lm


def _model(names: dict[str, int]):
    model = tiny_causal_lm().eval()
    for name, r in names.items():
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=2 * r, targets="all-linear"), name)
    randomize_adapters(model, 0.5)
    return model


def _refresh(cache: StackCache, model, check: bool = True) -> None:
    layers = lora_layer_list(model)
    cache.refresh(layers, layer_versions(layers), check_versions=check)


def _assert_fresh(cache: StackCache, model) -> None:
    """Every layer's cached stack equals one built from scratch over the same slots."""
    for layer in lora_layer_list(model):
        fresh = stack_layer(layer, cache.slots, layer.adapter_view(next(iter(layer.r))).base_device)
        held = cache.stacks[layer]
        assert torch.equal(held.a, fresh.a) and torch.equal(held.b, fresh.b)


def test_a_load_or_a_delete_restacks_only_what_changed():
    model = _model({"a": 4, "b": 8, "c": 2})
    layers = len(lora_layer_list(model))
    cache = StackCache()
    _refresh(cache, model)
    assert cache.restacked == 3 * layers
    _assert_fresh(cache, model)

    loraq.delete_adapter(model, "b")
    _refresh(cache, model)
    assert cache.slots == (None, "a", "c")
    assert cache.restacked == 0  # a and c copied from the old stack
    _assert_fresh(cache, model)

    loraq.apply(model, loraq.LoraConfig(r=8, alpha=3, targets="all-linear"), "d")
    randomize_adapters(model, 0.5)  # rewrites every B in place: all of them change
    _refresh(cache, model)
    assert cache.restacked == 3 * layers
    _assert_fresh(cache, model)

    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "e")
    _refresh(cache, model)
    assert cache.restacked == layers  # e only
    _assert_fresh(cache, model)


def test_an_in_place_edit_or_a_reload_under_the_same_name_is_restacked():
    model = _model({"a": 4, "b": 4})
    cache = StackCache()
    _refresh(cache, model)
    layer = lora_layer_list(model)[0]
    with torch.no_grad():
        layer.lora_B["a"].weight.add_(1.0)
    _refresh(cache, model)  # a new plan checks the tensors' versions
    _assert_fresh(cache, model)
    assert cache.restacked == 1  # the one edited layer's "a"

    # evicted and loaded again with new weights: the old tensors' ids may be reused
    loraq.delete_adapter(model, "b")
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "b")
    with torch.no_grad():
        for other in lora_layer_list(model):
            other.lora_B["b"].weight.normal_()
    _refresh(cache, model)
    _assert_fresh(cache, model)


@pytest.mark.parametrize("bigger", [True, False])
def test_a_new_top_rank_rebuilds_the_padding(bigger):
    model = _model({"a": 4})
    cache = StackCache()
    _refresh(cache, model)
    loraq.apply(model, loraq.LoraConfig(r=8 if bigger else 2, targets="all-linear"), "b")
    randomize_adapters(model, 0.5)
    _refresh(cache, model)
    _assert_fresh(cache, model)
    assert cache.stacks[lora_layer_list(model)[0]].a.shape[1] == (8 if bigger else 4)
