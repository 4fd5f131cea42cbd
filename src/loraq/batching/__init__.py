"""Mixed-adapter batches: each row of one forward pass through its own adapter.

=====================  ==========================================================================
module                 holds
=====================  ==========================================================================
:mod:`.rows`           ``adapter_rows(model, names)``: the public context manager
:mod:`.mixed`          the row plan and the per-row LoRA delta of one layer
:mod:`.stacks`         adapters stacked per layer, cached until an adapter changes
=====================  ==========================================================================

Imports ``layers`` and ``model``; imported by ``generation``, ``serve`` and ``train``.
"""
