"""Layer kinds: how a base module is seen as the matrix ``M`` and how an adapter runs on it.

:class:`~loraq.layers.lora.LoRALayer` is one wrapper for every kind; it picks one of the objects
below in ``__init__`` and asks it everything that depends on the base module's type:

==============  ===========================  ===========================  ========================
kind            base module                  ``M`` (delta orientation)    adapter branch
==============  ===========================  ===========================  ========================
linear          ``nn.Linear``                ``W``              (out, in)  ``B(A(x))``, fused
quantized       a :class:`QuantizedBase`     ``dequantize(W)``  (out, in)  ``B(A(x))``, fused
conv1d_gpt2     transformers ``Conv1D``      ``W.T``            (out, in)  ``B(A(x))``, fused
conv            ``nn.Conv1d/2d/3d``          ``W.flatten(1)``   (out, in·k) ``B_1x1(A_conv(x))``
embedding       ``nn.Embedding``             ``W.T``            (dim, vocab) ``emb(x, A.T) @ B.T``
==============  ===========================  ===========================  ========================

A quantized base reports the kind name ``"linear"`` (it computes as one); only how ``M`` is read
and written differs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.naming import MODULE_FACTOR_SUFFIXES, PARAMETER_FACTOR_SUFFIXES
from .protocol import QuantizedBase

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The module types a ``LoRALayer`` can wrap, for error messages.
SUPPORTED_TYPES = "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, transformers Conv1D"

Weight = torch.Tensor
#: ``(weight or zero-argument callable returning it, bias)`` for :func:`loraq.layers.fused.lora_linear`.
FusedBase = tuple[Any, torch.Tensor | None]


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer storing its weight as (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def zero_linear(in_features: int, out_features: int, **kw: Any) -> nn.Linear:
    """``nn.Linear(in_features, out_features, bias=False, **kw)`` with a zero weight, built
    without its random initialisation (most of the cost of a small layer: a server installs
    thousands of them, each about to be overwritten by loaded values)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw))
    layer.register_parameter("bias", None)
    return layer


class LayerKind:
    """What a ``LoRALayer`` needs to know about its base: the defaults serve dense linear maps."""

    #: The kind's name (``LoRALayer.kind``).
    name = "linear"
    #: The adapter's delta can go through the fused linear op (``B(A(x))`` on the last dim).
    fused_adapter = True
    #: The adapter has DoRA support.
    supports_dora = True
    #: On-disk key suffixes of A and B (after the module's name).
    factor_suffixes = MODULE_FACTOR_SUFFIXES

    def check(self, base: nn.Module) -> None:
        """Raise ``TypeError`` for a base of this type that cannot be wrapped."""

    def check_pissa(self, base: nn.Module) -> None:
        """Raise ``ValueError`` when PiSSA's SVD init cannot apply to this base."""

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base."""
        return base.in_features, base.out_features

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for rank ``r``, in the layer and in adapter files."""
        in_f, out_f = self.in_out(base)
        return (r, in_f), (out_f, r)

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        """Dtype and device of the base weight as the adapter sees it."""
        return base.weight.dtype, base.weight.device

    def matrix(self, base: nn.Module) -> torch.Tensor:
        """The base weight as ``M`` (detached)."""
        return base.weight.detach()

    def write_matrix(self, base: nn.Module, matrix: torch.Tensor) -> None:
        """Store ``M`` back into the base weight."""
        with torch.no_grad():
            base.weight.copy_(matrix.to(base.weight.dtype))

    def new_adapter(
        self, base: nn.Module, r: int, **kw: Any
    ) -> tuple[nn.Module | nn.Parameter, nn.Module | nn.Parameter]:
        """Fresh (uninitialised) A and B for rank ``r``."""
        in_f, out_f = self.in_out(base)
        return nn.Linear(in_f, r, bias=False, **kw), nn.Linear(r, out_f, bias=False, **kw)

    def new_zero_adapter(
        self, base: nn.Module, r: int, **kw: Any
    ) -> tuple[nn.Module | nn.Parameter, nn.Module | nn.Parameter]:
        """A and B as :meth:`new_adapter` makes them, all zeros, drawing no random
        initialisation: for an adapter whose tensors are loaded right after."""
        in_f, out_f = self.in_out(base)
        return zero_linear(in_f, r, **kw), zero_linear(r, out_f, **kw)

    def branch(
        self,
        base: nn.Module,
        a_mod: Any,
        b_mod: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        x: torch.Tensor,
    ) -> torch.Tensor:
        """``B(A(x))`` without the scale, with the weights ``a`` and ``b`` (maybe on a k-bit grid)."""
        return F.linear(F.linear(x, a), b)

    def base_without_bias(
        self, base: nn.Module, matrix: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """The base's output for ``x`` with weight ``matrix`` (``M``) and no bias."""
        return F.linear(x, matrix.to(x.dtype))

    def channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over an output of ``ndim`` dims."""
        return v

    def fused_base(
        self, base: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype
    ) -> FusedBase | None:
        """The base as ``lora_linear`` takes it, or None when base and adapter cannot run fused."""
        if type(base) is not nn.Linear:
            return None
        weight = base.weight
        if weight.requires_grad or x.dtype != weight.dtype or x.dtype != adapter_dtype:
            return None
        return weight, base.bias


class QuantizedKind(LayerKind):
    """A :class:`QuantizedBase`: ``M`` is the dequantized weight; writing ``M`` re-quantizes."""

    def dtype_device(self, base: nn.Module) -> tuple[torch.dtype, torch.device]:
        return base.compute_dtype, base.qweight.device

    def matrix(self, base: nn.Module) -> torch.Tensor:
        return base.dequantize_weight().detach()

    def write_matrix(self, base: nn.Module, matrix: torch.Tensor) -> None:
        base.set_weight(matrix)

    def fused_base(
        self, base: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype
    ) -> FusedBase | None:
        # Dequantized on demand in forward and again in backward, into the layer's scratch
        # buffer where it has one; no dense copy outlives the call. Called with no dtype it answers
        # in compute_dtype; fused.py passes the autocast dtype under autocast.
        reads_packed = getattr(base, "reads_packed", None)
        if reads_packed is not None and reads_packed(x):
            return None  # its own forward reads the blocks packed: cheaper than dequantizing
        scratch = getattr(base, "scratch", None)
        return partial(base.dequantize_weight, scratch=scratch), base.bias


class Conv1DKind(LayerKind):
    """transformers' GPT-2 ``Conv1D``: a linear map whose weight is stored ``(in, out)``."""

    name = "conv1d_gpt2"

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    def matrix(self, base: nn.Module) -> torch.Tensor:
        return base.weight.detach().t()

    def write_matrix(self, base: nn.Module, matrix: torch.Tensor) -> None:
        super().write_matrix(base, matrix.t())

    def fused_base(
        self, base: nn.Module, x: torch.Tensor, adapter_dtype: torch.dtype
    ) -> FusedBase | None:
        weight = base.weight
        if weight.requires_grad or x.dtype != weight.dtype or x.dtype != adapter_dtype:
            return None
        return weight.t(), base.bias


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` (groups=1): A is a convolution like the base, B a 1x1 convolution."""

    name = "conv"
    fused_adapter = False

    def check(self, base: nn.Module) -> None:
        if base.groups != 1:
            raise TypeError(
                f"LoRALayer supports convolutions with groups=1 only (got groups={base.groups})"
            )

    def check_pissa(self, base: nn.Module) -> None:
        if any(k != 1 for k in base.kernel_size):
            raise ValueError("init='pissa' on a convolution needs a 1x1 kernel")

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kernel = tuple(base.kernel_size)
        return (r, base.in_channels, *kernel), (base.out_channels, r, *([1] * len(kernel)))

    def matrix(self, base: nn.Module) -> torch.Tensor:
        return base.weight.detach().flatten(1)

    def write_matrix(self, base: nn.Module, matrix: torch.Tensor) -> None:
        super().write_matrix(base, matrix.reshape(base.weight.shape))

    def new_adapter(self, base: nn.Module, r: int, **kw: Any) -> tuple[nn.Module, nn.Module]:
        in_f, out_f = self.in_out(base)
        conv = type(base)
        a = conv(
            in_f, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **kw
        )
        return a, conv(r, out_f, 1, 1, bias=False, **kw)

    def new_zero_adapter(self, base: nn.Module, r: int, **kw: Any) -> tuple[nn.Module, nn.Module]:
        a, b = self.new_adapter(base, r, **kw)
        with torch.no_grad():
            a.weight.zero_(), b.weight.zero_()
        return a, b

    def branch(self, base, a_mod, b_mod, a, b, x):
        return b_mod._conv_forward(a_mod._conv_forward(x, a, None), b, None)

    def base_without_bias(self, base, matrix, x):
        return base._conv_forward(x, matrix.reshape(base.weight.shape).to(x.dtype), None)

    def channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(1, -1, *([1] * (ndim - 2)))

    def fused_base(self, base, x, adapter_dtype):
        return None


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: A and B are plain parameters; the adapter looks rows up in ``A.T``."""

    name = "embedding"
    fused_adapter = False
    supports_dora = False
    factor_suffixes = PARAMETER_FACTOR_SUFFIXES

    def in_out(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def matrix(self, base: nn.Module) -> torch.Tensor:
        return base.weight.detach().t()

    def write_matrix(self, base: nn.Module, matrix: torch.Tensor) -> None:
        super().write_matrix(base, matrix.t())

    def new_adapter(self, base: nn.Module, r: int, **kw: Any) -> tuple[nn.Parameter, nn.Parameter]:
        a_shape, b_shape = self.factor_shapes(base, r)
        return nn.Parameter(torch.zeros(a_shape, **kw)), nn.Parameter(torch.zeros(b_shape, **kw))

    new_zero_adapter = new_adapter  # zeros already

    def branch(self, base, a_mod, b_mod, a, b, x):
        hidden = F.embedding(
            x,
            a.t(),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )
        return hidden @ b.t()

    def fused_base(self, base, x, adapter_dtype):
        return None


LINEAR = LayerKind()
QUANTIZED = QuantizedKind()
CONV1D_GPT2 = Conv1DKind()
CONV = ConvKind()
EMBEDDING = EmbeddingKind()


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind object for ``module``, or None when a ``LoRALayer`` cannot wrap it."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if is_gpt2_conv1d(module):
        return CONV1D_GPT2
    if isinstance(module, _CONV_TYPES):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, QuantizedBase):
        return QUANTIZED
    return None
