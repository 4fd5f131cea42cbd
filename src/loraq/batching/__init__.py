"""Mixed-adapter batches: each row of one forward pass through its own adapter.

=====================  ==========================================================================
module                 holds
=====================  ==========================================================================
:mod:`.rows`           ``adapter_rows(model, names)``: the public context manager
:mod:`.mixed`          the row plan and the per-row LoRA delta of one layer
:mod:`.stacks`         adapters stacked per layer, cached until an adapter changes
:mod:`.pool`           a server's resident adapters as slots of such stacks, no modules
=====================  ==========================================================================

A layer is read only through its public contract (:mod:`loraq.layers.adapter_view`): the
adapter views, ``adapter_version``, and the ``row_hook`` this package installs.

Imports ``layers`` and ``model``; imported by ``generation`` and the package root. ``io`` sits
on the same floor and neither imports the other (``tests/test_imports.py``).
"""
