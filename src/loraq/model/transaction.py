"""All or nothing: undo every change a failed call made to a model.

``apply``, ``load_adapter`` and the like change a model in many small steps (quantize a layer,
wrap it, add an adapter, load tensors). They validate what they can before the first change;
:func:`model_transaction` covers what validation cannot foresee (a bad tensor found half-way,
an out-of-memory error, a bug), so that a call that raises leaves the model exactly as it was.

What is recorded when the transaction starts, and restored if the body raises:

=====================================  ==================================================
recorded                               covers
=====================================  ==================================================
each module's attributes (shallow)     submodules swapped or wrapped, parameters and
                                       buffers added or replaced, adapter tables
                                       (``r``, ``active_adapters``, ``loraq_configs`` ...)
each parameter's ``requires_grad``     freezing and unfreezing
each parameter's ``.data`` (an alias)  ``model.to(dtype)``, which swaps a parameter's data
                                       but keeps the ``Parameter`` object
copies of the ``protect`` tensors      tensors the body writes in place (PiSSA's residual,
                                       a dense base weight a merge adds ``B·A`` to)
=====================================  ==================================================

Modules and tensors created inside a failed transaction are dropped with it. Tensors that
existed before and are written in place must be listed in ``protect``: recording every tensor
would double the model's memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .walk import walk_modules, walk_parameters

#: Containers copied by their own C ``copy()``: ``copy.copy`` takes its generic
#: ``__reduce_ex__`` path for an ``OrderedDict`` (a module's hook tables), which made the
#: snapshot of a model with 64 adapters (14,000 modules) cost a second.
_FAST_COPY = frozenset({dict, list, set, OrderedDict})


def _shallow(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        if type(value) in _FAST_COPY:
            value = value.copy()
        elif isinstance(value, (dict, list, set)):
            value = copy.copy(value)
        out[key] = value
    return out


class ModelSnapshot:
    """The restorable state of ``model`` at construction time (see the module docs)."""

    def __init__(
        self,
        model: nn.Module,
        protect: Iterable[torch.Tensor] = (),
        modules: Iterable[nn.Module] | None = None,
    ) -> None:
        if modules is None:
            self._modules = [(m, _shallow(m.__dict__)) for _, m in walk_modules(model)]
            params = walk_parameters(model)
        else:  # a change known to touch these modules only (their own attributes)
            listed = list(dict.fromkeys(modules))
            self._modules = [(m, _shallow(m.__dict__)) for m in listed]
            params = [p for m in listed for p in m._parameters.values() if p is not None]
        self._flags = [(p, p.requires_grad) for p in params]
        self._data = [(p, p.data) for p in params]
        seen: set[int] = set()
        self._tensors = []
        for t in protect:
            if id(t) not in seen:
                seen.add(id(t))
                self._tensors.append((t, t.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the model back as it was when the snapshot was taken."""
        for module, state in self._modules:
            module.__dict__.clear()
            module.__dict__.update(_shallow(state))
        for param, data in self._data:
            param.data = data
        for param, flag in self._flags:
            param.requires_grad_(flag)
        for tensor, data in self._tensors:
            tensor.copy_(data)


@contextlib.contextmanager
def model_transaction(
    model: nn.Module,
    protect: Iterable[torch.Tensor] = (),
    modules: Iterable[nn.Module] | None = None,
) -> Iterator[ModelSnapshot]:
    """Run the body; if it raises, restore ``model`` (and ``protect``) and re-raise.

    ``modules``: when the body is known to change only these modules' own attributes (and
    to create new modules), record just them, not the whole model.
    """
    snapshot = ModelSnapshot(model, protect, modules)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
