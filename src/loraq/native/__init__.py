"""Small C kernels compiled on first use, each with a pure-PyTorch twin it is tested against.

* :mod:`.build` - finds the C compiler, builds a kernel into the user's cache and loads it.
* :mod:`.bernoulli` - dropout masks drawn exactly as ``Tensor.bernoulli_`` draws them on CPU,
  and kept at one bit per element.

The dequantize kernels of :mod:`loraq.native.dequant` (blockwise and GGUF, k-quants included),
the k-quant quantizers of :mod:`loraq.native.kquant`, the decode layer and per-row LoRA of
:mod:`loraq.native.lean_layer` and the adapter pool's slot writes of :mod:`loraq.native.slots`
are built by :mod:`.build` too.
"""
