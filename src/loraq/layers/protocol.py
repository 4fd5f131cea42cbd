"""``QuantizedWeight`` and ``QuantizedBase``: what loraq needs from a quantized weight and layer.

A *quantized weight* is a record (:class:`~loraq.quant.QuantizedTensor`,
:class:`~loraq.quant.QuantizedTensor8`, ...) that knows its dense ``shape``, ``dtype`` and
``device``, its storage size ``nbytes``, and how to ``dequantize`` itself. A *quantized base* is
a frozen linear layer holding one as ``qweight``.

Adapters (:class:`loraq.LoRALayer`), merging, ``unload(dense=True)``, ``quantize_model`` /
``dequantize_model`` and ``summary`` see a quantized base only through this Protocol, so a new
storage format (a GGUF block format, say) plugs in by providing these members; nothing else in
loraq checks for concrete classes except the file formats that write a layer's own bytes.

==========================  =====================================================================
member                      meaning
==========================  =====================================================================
``qweight``                 the :class:`QuantizedWeight` record
``in_features``             input width of the linear map ``y = x W^T + b``
``out_features``            output width; the weight is ``(out_features, in_features)``
``compute_dtype``           dtype the weight is dequantized to for the matmul
``bias``                    dense bias (a frozen ``nn.Parameter``) or ``None``
``dense_layout``            the dense module it stands for: ``"linear"`` (``nn.Linear``, weight
                            ``(out, in)``) or ``"conv1d"`` (transformers' GPT-2 ``Conv1D``,
                            weight stored ``(in, out)``); dequantizing restores that module
``dequantize_weight``       dense ``(out, in)`` weight; ``scratch=`` lets the layer write it into
                            a reusable :class:`~loraq.layers.scratch.DequantScratch` buffer
``set_weight``              re-quantize a dense ``(out, in)`` weight with the layer's settings
``forward``                 ``x W^T + b`` with the dequantized weight, output in ``x.dtype``
==========================  =====================================================================

The weight never requires a gradient. ``isinstance(module, QuantizedBase)`` checks that the
members exist (a ``runtime_checkable`` Protocol), not their types.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

#: ``dense_layout`` of a base that stands for an ``nn.Linear``.
LAYOUT_LINEAR = "linear"
#: ``dense_layout`` of a base that stands for transformers' GPT-2 ``Conv1D``.
LAYOUT_CONV1D = "conv1d"
#: The values ``dense_layout`` may take.
DENSE_LAYOUTS = (LAYOUT_LINEAR, LAYOUT_CONV1D)


@runtime_checkable
class QuantizedWeight(Protocol):
    """A frozen weight stored quantized (a record such as :class:`~loraq.quant.QuantizedTensor`)."""

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the tensor had before quantization (the default dequantization dtype)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        ...

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of the stored per-tensor data (codes and scales; shared code books excluded)."""
        ...

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor in ``dtype`` (default: :attr:`dtype`)."""
        ...


def quantized_weight_of(module: Any) -> QuantizedWeight | None:
    """The quantized weight record ``module`` holds as ``qweight``, or None."""
    record = getattr(module, "qweight", None)
    return record if isinstance(record, QuantizedWeight) else None


@runtime_checkable
class QuantizedBase(Protocol):
    """A frozen linear layer with a quantized weight (see the module docstring's table)."""

    qweight: QuantizedWeight
    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    bias: torch.Tensor | None
    dense_layout: str

    def dequantize_weight(
        self, dtype: torch.dtype | None = None, *, scratch: Any = None
    ) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default:
        ``compute_dtype``). With ``scratch`` the result may live in that reusable buffer and is
        valid only until the buffer's next use on this thread."""
        ...

    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a dense ``(out, in)`` weight with this layer's settings (lossy)."""
        ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` with the dequantized weight, in ``x.dtype``."""
        ...
