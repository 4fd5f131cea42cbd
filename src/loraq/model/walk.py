"""A fast walk over a model's modules: ``named_modules``' order and names, without its cost.

``nn.Module.named_modules`` recurses through one generator per nesting level, so each module
it yields passes through every enclosing generator; a model with 64 adapters has about 14,000
modules (each adapter adds a ``Linear`` per factor per layer), and adding one more adapter
walks the model a dozen times. :func:`walk_modules` visits the same modules in the same
pre-order with the same dotted names, each module once (as ``named_modules`` does), from one
explicit stack.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def walk_modules(
    model: nn.Module, stop_at: tuple[type, ...] = ()
) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` like ``model.named_modules()``; modules of a ``stop_at`` type are
    yielded but not entered (their children are skipped)."""
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
        children = [
            (f"{name}.{key}" if name else key, child)
            for key, child in module._modules.items()
            if child is not None
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
