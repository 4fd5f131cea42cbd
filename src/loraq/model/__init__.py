"""Surgery on a whole model: which modules a config selects, and changing them all or nothing.

=====================  ==========================================================================
module                 holds
=====================  ==========================================================================
:mod:`.config`         ``LoraConfig``: what to adapt and how, validated up front
:mod:`.targeting`      name patterns, output heads, candidate modules, ``set_submodule``
:mod:`.surgery`        ``apply`` / ``set_adapter`` / ``merge`` / ``unmerge`` / ``unload`` ...
:mod:`.quantize`       ``quantize_model``: swap frozen Linears for quantized bases
:mod:`.loftq`          LoftQ over a whole model (the per-layer math is :mod:`loraq.layers.loftq`)
:mod:`.merging`        merging over a quantized base: ``dequantized`` / ``original`` / ``requantize``
:mod:`.combine`       ``combine``: a new adapter from weighted ones (linear, cat, SVD, TIES, DARE)
:mod:`.merge_rules`   the tensor rules ``combine`` uses: task arithmetic, TIES, DARE, pruning
:mod:`.decompose`      low-rank compression of Linears by truncated SVD
:mod:`.transaction`    undo every change a failed call made to a model
:mod:`.summary`        trainable and total parameters, bytes per part
=====================  ==========================================================================

Imports ``core``, ``quant``, ``layers`` (and ``native`` through them); imported by ``batching``,
``io``, ``generation`` and everything above them.
"""
