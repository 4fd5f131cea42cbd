"""Adapter wrappers (:mod:`.lora`, :mod:`.qlora`), their per-kind logic (:mod:`.kinds`), the fused
LoRA op (:mod:`.fused`), quantized bases (:mod:`.quantized`, :mod:`.gguf`, described by the
:class:`~.protocol.QuantizedBase` Protocol; :mod:`.bases` maps each base format's record to its
layer and builds them), k-bit adapter grids (:mod:`.adapter_quant`) and the
model's own dropout drawn by loraq's mask kernel (:mod:`.dropout`). What code above sees of a
``LoRALayer`` besides its documented attributes, an adapter's view and the row hook it may
install, is :mod:`.adapter_view`; ``layers`` imports nothing above ``quant``."""

from .protocol import QuantizedBase, QuantizedWeight

__all__ = ["QuantizedBase", "QuantizedWeight"]
