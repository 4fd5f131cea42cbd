"""Fast paths for dequantization, each tested bit-equal to the pure-PyTorch reference.

* :mod:`.cpu` - a C kernel compiled on first use (AVX2 where the CPU has it), used by
  :func:`loraq.quant.dequantize_4bit` / ``dequantize_8bit`` on CPU when it builds.
* :mod:`.triton_dequant` - Triton kernels for CUDA (tested on CPU under ``TRITON_INTERPRET=1``).

Without a compiler (or Triton) everything falls back to :mod:`loraq.quant.blockwise`.
"""
