"""Frozen quantized base layers: :class:`Linear4bit`, :class:`Linear8bit`, :class:`Embedding4bit`.

Each layer keeps its weight only in quantized form (a :class:`~loraq.quant.QuantizedTensor` or
:class:`~loraq.quant.QuantizedTensor8`). The record's tensors are registered as non-persistent
buffers, so ``.to(device)``, ``.cuda()`` and ``buffers()`` see them, but a dtype conversion such
as ``model.to(torch.bfloat16)`` never touches them: uint8 codes and float32 scales keep their
exact bytes. ``state_dict()`` writes the weight under bitsandbytes' keys (``weight``,
``weight.absmax``, ``weight.quant_map``, ...; see :mod:`loraq.quant.qtensor`) and
``load_state_dict()`` reads them back, including files written by bitsandbytes/transformers.

The linear forward is one autograd function: it dequantizes the weight into the compute dtype,
applies ``F.linear``, and keeps only the quantized record for backward, where the weight is
dequantized again to form the input gradient (the frozen weight gets no gradient). On CPU the
dequantized weight goes into the layer's :class:`DequantScratch` (by default one shared by all
layers, :data:`SHARED_SCRATCH`), so no layer keeps a dense copy and no call pays for fresh pages.

The linear layers implement :class:`~loraq.layers.protocol.QuantizedBase`; ``dense_layout``
records whether one stands for an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose dense weight is
stored transposed), so dequantizing gives back the module the model class expects.

Why not tiles (dequantize a few rows, matmul, repeat)? It avoids the scratch buffer, but BLAS
kernels pick different code paths for different output widths (remainder rows, thread splits,
gemv for one token), so tiled results differ from ``F.linear`` on the whole weight in the last
bit for many shapes; the full weight keeps the forward exactly equal to that reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.precision import autocast_dtype
from ..quant.codebooks import DEFAULT_BLOCKSIZE_4BIT, DEFAULT_BLOCKSIZE_8BIT
from ..quant.qtensor import QuantizedTensor
from ..quant.qtensor8 import QuantizedTensor8
from .kinds import is_gpt2_conv1d
from .protocol import DENSE_LAYOUTS, LAYOUT_CONV1D, LAYOUT_LINEAR
from .scratch import SHARED_SCRATCH, DequantScratch, release_scratch

__all__ = [
    "SHARED_SCRATCH",
    "DequantScratch",
    "Embedding4bit",
    "Linear4bit",
    "Linear8bit",
    "release_scratch",
]

Record = QuantizedTensor | QuantizedTensor8

#: Prefix of the names under which a quantized layer holds its record's tensors (buffers, or
#: frozen parameters once exposed for sharding): ``weight_packed``, ``weight_absmax``, ...
RECORD_PREFIX = "weight_"
_BUF = RECORD_PREFIX
#: Record fields with per-element data (codes, block scales): what FSDP may split across ranks.
#: The others (code books, the double-quantization offset) are small constants kept whole.
SHARDABLE_FIELDS = ("packed", "absmax", "absmax_codes", "nested_absmax", "codes")


def _dequantize(weight: Record, dtype: torch.dtype, scratch: DequantScratch | None) -> torch.Tensor:
    """The dense weight; in ``scratch`` (valid until its next borrow) when given and on CPU.

    Elsewhere (CUDA's caching allocator already reuses memory) a fresh tensor is returned.
    """
    if scratch is None or weight.device.type != "cpu":
        return weight.dequantize(dtype)
    buf = scratch.borrow(weight.numel, dtype)
    return weight.dequantize_range(0, weight.numel, buf).view(weight.shape)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, str]:
    """The ``(out, in)`` weight of an ``nn.Linear`` or GPT-2 ``Conv1D``, and its dense layout."""
    if is_gpt2_conv1d(module):
        return module.weight.t(), LAYOUT_CONV1D
    if isinstance(module, nn.Linear):
        return module.weight, LAYOUT_LINEAR
    raise TypeError(f"expected an nn.Linear or a GPT-2 Conv1D, got {type(module).__name__}")


class _QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with W dequantized on the fly; saves only the quantized record."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        weight: Record,
        dtype: torch.dtype,
        scratch: DequantScratch | None,
    ):
        amp_dtype = autocast_dtype(x.device.type)
        # Under autocast the weight is dequantized straight into the autocast dtype (the same
        # values as float32 then a cast) and the output stays in it, as F.linear's would.
        dtype = dtype if amp_dtype is None else amp_dtype
        ctx.weight = weight  # references the stored quantized tensors, no dense copy
        ctx.dtype = dtype
        ctx.scratch = scratch
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(dtype)
        out = F.linear(x.to(dtype), _dequantize(weight, dtype, scratch), b)
        # Without autocast the output follows the input dtype, as bitsandbytes' Linear4bit.
        return out if amp_dtype is not None else out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        g = grad_out.to(ctx.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(_dequantize(ctx.weight, ctx.dtype, ctx.scratch)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None


class _QuantizedModule(nn.Module):
    """Holds a quantized record as device-only buffers and (de)serialises it in bnb's layout."""

    _record_type: type = QuantizedTensor

    def _set_record(self, record: Record) -> None:
        """Store ``record``: its tensors become buffers (or frozen parameters, see
        :meth:`expose_for_sharding`), the rest plain attributes."""
        for name, tensor in record.tensors().items():
            if _BUF + name in self._parameters:
                self._parameters[_BUF + name] = nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(_BUF + name, tensor, persistent=False)
        tensor_names = set(record.tensors())
        self._record_meta = {
            f.name: getattr(record, f.name)
            for f in dataclasses.fields(record)
            if f.name not in tensor_names
        }

    def expose_for_sharding(self) -> None:
        """Hold the per-element record tensors (:data:`SHARDABLE_FIELDS`) as frozen parameters.

        FSDP shards parameters, not buffers: after this, ``fully_shard`` splits the packed codes
        and block scales across ranks and all-gathers them (as bytes) around each forward and
        backward. The state dict is unchanged (bitsandbytes' keys, not these names).
        """
        for name in SHARDABLE_FIELDS:
            tensor = self._buffers.get(_BUF + name)
            if tensor is not None:
                del self._buffers[_BUF + name]
                self.register_parameter(_BUF + name, nn.Parameter(tensor, requires_grad=False))

    @property
    def qweight(self) -> Record:
        """The quantized weight record, built over this module's buffers (no copy)."""
        held = {**self._buffers, **self._parameters}
        tensors = {name: held[_BUF + name] for name in self._record_type.TENSOR_FIELDS}
        return self._record_type(**tensors, **self._record_meta)

    @property
    def weight(self) -> Record:
        """Alias of :attr:`qweight`: ``.shape``, ``.dtype`` and ``.device`` read like a dense weight's."""
        return self.qweight

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # nn.Module._apply would also cast float buffers (the float32 scales) on .to(dtype),
        # .half() or .bfloat16(): let it handle everything else, and only move ours.
        held = {n: self._buffers.pop(n) for n in self._buffers.copy() if n.startswith(_BUF)}
        params = {n: self._parameters.pop(n) for n in self._parameters.copy() if n.startswith(_BUF)}
        try:
            super()._apply(fn, recurse)
        finally:
            anchor = next(t for t in (*held.values(), *params.values()) if t is not None)
            device = fn(torch.empty(0, dtype=torch.uint8, device=anchor.device)).device
            for name, tensor in held.items():
                self._buffers[name] = None if tensor is None else tensor.to(device)
            for name, param in params.items():
                moved = param.data.to(device)
                if moved is not param.data:
                    param = nn.Parameter(moved, requires_grad=False)
                self._parameters[name] = param
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        entries = self.qweight.to_state_dict(prefix)
        weight_key = prefix + "weight"
        destination[weight_key] = entries.pop(weight_key)  # bitsandbytes' order: weight, bias, ...
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._parameters:  # record tensors exposed for sharding: saved as above
            if name.startswith(_BUF):
                destination.pop(prefix + name, None)
        destination.update(entries)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight_key = prefix + "weight"
        ours = [k for k in state_dict if k == weight_key or k.startswith(weight_key + ".")]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        exposed = {prefix + n for n in self._parameters if n.startswith(_BUF)}
        missing_keys[:] = [k for k in missing_keys if k not in exposed]
        if not ours:
            missing_keys.extend(self.qweight.to_state_dict(prefix))
            return
        try:
            record = self._record_type.from_state_dict(state_dict, prefix)
        except ValueError as err:
            error_msgs.append(f"while loading {weight_key}: {err}")
            return
        if record.shape != self.qweight.shape:
            error_msgs.append(
                f"size mismatch for {weight_key}: checkpoint holds shape {tuple(record.shape)}, "
                f"this module has {tuple(self.qweight.shape)}"
            )
            return
        self._set_record(record.to(self.qweight.device))


class _QuantizedLinear(_QuantizedModule):
    """Shared forward and bookkeeping of :class:`Linear4bit` and :class:`Linear8bit`.

    ``scratch`` is where the forward pass dequantizes on CPU (:data:`SHARED_SCRATCH` unless set;
    ``None`` allocates a fresh tensor per call).
    """

    def __init__(
        self,
        qweight: Record,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        dense_layout: str = LAYOUT_LINEAR,
    ) -> None:
        super().__init__()
        if dense_layout not in DENSE_LAYOUTS:
            raise ValueError(f"dense_layout must be one of {DENSE_LAYOUTS}, got {dense_layout!r}")
        self.dense_layout = dense_layout
        self.scratch: DequantScratch | None = SHARED_SCRATCH
        if len(qweight.shape) != 2:
            raise ValueError(
                f"a linear weight must be 2-D (out, in), got shape {tuple(qweight.shape)}"
            )
        if not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating-point dtype, got {compute_dtype}")
        self._set_record(qweight)
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(
                    f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
                )
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` with W dequantized to ``compute_dtype``; output in ``x.dtype``."""
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects a floating-point input (as nn.Linear does), got "
                f"{x.dtype}"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}"
            )
        return _QuantizedLinearFunction.apply(
            x, self.bias, self.qweight, self.compute_dtype, self.scratch
        )

    def dequantize_weight(
        self, dtype: torch.dtype | None = None, *, scratch: DequantScratch | None = None
    ) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: ``compute_dtype``).

        With ``scratch`` (on CPU) the result is written into that buffer and is valid only until
        its next borrow on this thread; without, it is a fresh tensor.
        """
        return _dequantize(self.qweight, self.compute_dtype if dtype is None else dtype, scratch)

    def _quantize(self, weight: torch.Tensor) -> Record:
        raise NotImplementedError

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a dense ``(out, in)`` weight with this layer's settings (e.g. after a merge).

        Quantization is lossy: ``dequantize_weight()`` afterwards is close to, not equal to, ``weight``.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must have shape ({self.out_features}, {self.in_features}), got {tuple(weight.shape)}"
            )
        old = self.qweight
        record = dataclasses.replace(self._quantize(weight.to(old.device)), dtype=old.dtype)
        self._set_record(record)

    def extra_repr(self) -> str:
        layout = "" if self.dense_layout == LAYOUT_LINEAR else f", dense_layout={self.dense_layout}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._format_repr()}, "
            f"compute_dtype={self.compute_dtype}{layout}"
        )

    def _format_repr(self) -> str:
        raise NotImplementedError


class Linear4bit(_QuantizedLinear):
    """A frozen ``nn.Linear`` whose weight is stored in 4 bits (NF4 or FP4), as QLoRA's base.

    Build it with :meth:`from_linear`. The forward equals ``F.linear(x, W, b)`` exactly, where
    ``W = dequantize_weight()`` in ``compute_dtype``; the bias stays in its original dtype.
    """

    _record_type = QuantizedTensor

    def __init__(
        self,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        dense_layout: str = LAYOUT_LINEAR,
    ) -> None:
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"qweight must be a QuantizedTensor, got {type(qweight).__name__}")
        super().__init__(qweight, bias, compute_dtype, dense_layout)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        blocksize: int = DEFAULT_BLOCKSIZE_4BIT,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear4bit:
        """Quantize the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (see
        :meth:`~loraq.quant.QuantizedTensor.from_tensor`); copies the bias and records the layout."""
        weight, layout = _linear_weight(linear)
        qweight = QuantizedTensor.from_tensor(weight, blocksize, quant_type, double_quant)
        return cls(qweight, linear.bias, compute_dtype, layout)

    def _quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        q = self.qweight
        return QuantizedTensor.from_tensor(weight, q.blocksize, q.quant_type, q.double_quant)

    def _format_repr(self) -> str:
        q = self.qweight
        return f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}"


class Linear8bit(_QuantizedLinear):
    """A frozen ``nn.Linear`` whose weight is stored as 8-bit blockwise dynamic-map codes.

    This is bitsandbytes' ``quantize_blockwise`` format (as used for optimizer states), not
    LLM.int8 (``bnb.nn.Linear8bitLt``); its state-dict layout is loraq's own (see
    :mod:`loraq.quant.qtensor`).
    """

    _record_type = QuantizedTensor8

    def __init__(
        self,
        qweight: QuantizedTensor8,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        dense_layout: str = LAYOUT_LINEAR,
    ) -> None:
        if not isinstance(qweight, QuantizedTensor8):
            raise TypeError(f"qweight must be a QuantizedTensor8, got {type(qweight).__name__}")
        super().__init__(qweight, bias, compute_dtype, dense_layout)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = DEFAULT_BLOCKSIZE_8BIT,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear8bit:
        """Quantize the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (see
        :meth:`~loraq.quant.QuantizedTensor8.from_tensor`); copies the bias and records the layout."""
        weight, layout = _linear_weight(linear)
        return cls(
            QuantizedTensor8.from_tensor(weight, blocksize), linear.bias, compute_dtype, layout
        )

    def _quantize(self, weight: torch.Tensor) -> QuantizedTensor8:
        return QuantizedTensor8.from_tensor(weight, self.qweight.blocksize)

    def _format_repr(self) -> str:
        return f"quant_type={self.qweight.quant_type}, blocksize={self.qweight.blocksize}"


class Embedding4bit(_QuantizedModule):
    """A frozen ``nn.Embedding`` stored in 4 bits; a lookup dequantizes only the rows it needs.

    The output equals ``F.embedding(ids, W)`` with ``W = dequantize_weight()`` exactly.
    """

    _record_type = QuantizedTensor

    def __init__(
        self,
        qweight: QuantizedTensor,
        padding_idx: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(qweight, self._record_type) or len(qweight.shape) != 2:
            raise ValueError(
                f"qweight must be a 2-D {self._record_type.__name__} (num_embeddings, embedding_dim)"
            )
        self._set_record(qweight)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.compute_dtype = qweight.dtype if compute_dtype is None else compute_dtype

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        quant_type: str = "nf4",
        blocksize: int = DEFAULT_BLOCKSIZE_4BIT,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Embedding4bit:
        """Quantize ``embedding.weight``; output dtype ``compute_dtype`` (default: the weight's).

        Raises:
            ValueError: for ``max_norm`` (it rewrites the table in place) or sparse gradients.
        """
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("Embedding4bit supports neither max_norm nor sparse embeddings")
        qweight = QuantizedTensor.from_tensor(embedding.weight, blocksize, quant_type, double_quant)
        return cls(qweight, embedding.padding_idx, compute_dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        # Follow float conversions (model.to(torch.bfloat16), .half()) as nn.Embedding's output
        # would; the stored codes and scales stay as they are.
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the dequantized table, shape ``(*ids.shape, embedding_dim)``."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"embedding indices must be int32 or int64, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"index out of range in {type(self).__name__} (num_embeddings={self.num_embeddings})"
            )
        return self._lookup(ids)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(self.embedding_dim, device=ids.device)
        flat = ids.to(torch.int64).unsqueeze(-1) * self.embedding_dim + columns
        return self.qweight.dequantize_elements(flat, self.compute_dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` table in ``dtype`` (default: ``compute_dtype``)."""
        return self.qweight.dequantize(self.compute_dtype if dtype is None else dtype)

    def extra_repr(self) -> str:
        q = self.qweight
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, quant_type={q.quant_type}, "
            f"blocksize={q.blocksize}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}"
        )


#: Public name of the base of every layer above (:class:`Linear4bit`, :class:`Linear8bit`,
#: :class:`Embedding4bit`): what FSDP sharding and per-rank memory accounting look for.
QuantizedModule = _QuantizedModule
