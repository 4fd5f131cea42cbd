"""A fast walk over a model's modules: ``named_modules``' order and names, without its cost.

``nn.Module.named_modules`` recurses through one generator per nesting level, so each module
it yields passes through every enclosing generator; a model with 64 adapters has about 14,000
modules (each adapter adds a ``Linear`` per factor per layer), and adding one more adapter
walks the model a dozen times. :func:`walk_modules` visits the same modules in the same
pre-order with the same dotted names, each module once (as ``named_modules`` does), from one
explicit stack. ``skip_adapter_stores`` leaves out the per-adapter modules inside adapter
wrappers (each adapter's factors and dropout), which never hold another wrapper: a search for
wrappers then walks the base model's size, however many adapters it carries.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..core.naming import ADAPTER_STORES
from ..layers.lora import LoRALayer
from ..layers.param_lora import ParamLoRA

#: Children of a ``LoRALayer`` / ``ParamLoRA`` holding one module per adapter.
_PER_ADAPTER = frozenset((*ADAPTER_STORES, "lora_dropout"))


def walk_modules(
    model: nn.Module, stop_at: tuple[type, ...] = (), *, skip_adapter_stores: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` like ``model.named_modules()``; modules of a ``stop_at`` type are
    yielded but not entered (their children are skipped), and with ``skip_adapter_stores``
    neither are the per-adapter stores of adapter wrappers (see the module doc)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if stop_at and isinstance(module, stop_at):
            continue
        skip = (
            _PER_ADAPTER
            if skip_adapter_stores and isinstance(module, (LoRALayer, ParamLoRA))
            else ()
        )
        children = [
            (f"{name}.{key}" if name else key, child)
            for key, child in module._modules.items()
            if child is not None and key not in skip
        ]
        stack.extend(reversed(children))


def walk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` once, in ``model.parameters()``' order."""
    seen: set[int] = set()
    params = []
    for _, module in walk_modules(model):
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params
