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
dequantized weight goes into one scratch buffer per thread shared by all layers (see
``_dense_weight``), so no layer keeps a dense copy and no call pays for fresh pages.

Why not tiles (dequantize a few rows, matmul, repeat)? It avoids the scratch buffer, but BLAS
kernels pick different code paths for different output widths (remainder rows, thread splits,
gemv for one token), so tiled results differ from ``F.linear`` on the whole weight in the last
bit for many shapes; the full weight keeps the forward exactly equal to that reference.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.blockwise import dequantize_4bit_elements, quantize_4bit, quantize_8bit
from ..quant.qtensor import QuantizedTensor, QuantizedTensor8

__all__ = ["Embedding4bit", "Linear4bit", "Linear8bit", "release_scratch"]

Record = QuantizedTensor | QuantizedTensor8

# Reuse one dequantization buffer per (thread, dtype) on CPU; see _dense_weight.
REUSE_SCRATCH = True
_scratch = threading.local()
# Prefix of the buffers that hold the record's tensors.
_BUF = "weight_"
#: Record fields with per-element data (codes, block scales): what FSDP may split across ranks.
#: The others (code books, the double-quantization offset) are small constants kept whole.
SHARDABLE_FIELDS = ("packed", "absmax", "absmax_codes", "nested_absmax", "codes")


def _scratch_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffers: dict[torch.dtype, torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        # A normal tensor even inside inference_mode, so later training steps may write to it.
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype)
        buffers[dtype] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's reusable dequantization buffers (see :data:`REUSE_SCRATCH`)."""
    _scratch.__dict__.pop("buffers", None)


def _dense_weight(weight: Record, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight for one matmul; valid until the next call on this thread.

    On CPU a fresh multi-megabyte tensor costs more in page faults (the allocator returns large
    blocks to the OS on free) than the dequantization itself, so the weight is written into a
    buffer reused by every quantized layer on this thread: it holds the largest layer's weight
    size, not a copy per layer, and it is garbage between calls. Elsewhere (CUDA's caching
    allocator already reuses memory) or with ``REUSE_SCRATCH = False``, a fresh tensor is used.
    """
    if not REUSE_SCRATCH or weight.device.type != "cpu":
        return weight.dequantize(dtype)
    buf = _scratch_buffer(weight.numel, dtype)
    return weight.dequantize_range(0, weight.numel, buf).view(weight.shape)


class _QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with W dequantized on the fly; saves only the quantized record."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, weight: Record, dtype: torch.dtype
    ):
        ctx.weight = weight  # references the stored quantized tensors, no dense copy
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        b = None if bias is None else bias.to(dtype)
        # The output follows the input dtype, as bitsandbytes' Linear4bit.
        return F.linear(x.to(dtype), _dense_weight(weight, dtype), b).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        g = grad_out.to(ctx.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(_dense_weight(ctx.weight, ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


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
    """Shared forward and bookkeeping of :class:`Linear4bit` and :class:`Linear8bit`."""

    def __init__(
        self, qweight: Record, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
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
        return _QuantizedLinearFunction.apply(x, self.bias, self.qweight, self.compute_dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: ``compute_dtype``)."""
        return self.qweight.dequantize(self.compute_dtype if dtype is None else dtype)

    def matmul_weight(self) -> torch.Tensor:
        """The dense weight in ``compute_dtype`` for one matmul, in this thread's shared scratch
        buffer on CPU: valid only until the next quantized layer dequantizes (see ``_dense_weight``)."""
        return _dense_weight(self.qweight, self.compute_dtype)

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
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._format_repr()}, compute_dtype={self.compute_dtype}"
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
    ) -> None:
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"qweight must be a QuantizedTensor, got {type(qweight).__name__}")
        super().__init__(qweight, bias, compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear4bit:
        """Quantize ``linear.weight`` (see :func:`~loraq.quant.quantize_4bit`); copies the bias."""
        qweight = quantize_4bit(linear.weight, blocksize, quant_type, double_quant)
        return cls(qweight, linear.bias, compute_dtype)

    def _quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        q = self.qweight
        return quantize_4bit(weight, q.blocksize, q.quant_type, q.double_quant)

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
    ) -> None:
        if not isinstance(qweight, QuantizedTensor8):
            raise TypeError(f"qweight must be a QuantizedTensor8, got {type(qweight).__name__}")
        super().__init__(qweight, bias, compute_dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, blocksize: int = 256, compute_dtype: torch.dtype = torch.float32
    ) -> Linear8bit:
        """Quantize ``linear.weight`` (see :func:`~loraq.quant.quantize_8bit`); copies the bias."""
        return cls(quantize_8bit(linear.weight, blocksize), linear.bias, compute_dtype)

    def _quantize(self, weight: torch.Tensor) -> QuantizedTensor8:
        return quantize_8bit(weight, self.qweight.blocksize)

    def _format_repr(self) -> str:
        return f"quant_type=dynamic8, blocksize={self.qweight.blocksize}"


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
        if not isinstance(qweight, QuantizedTensor) or len(qweight.shape) != 2:
            raise ValueError(
                "qweight must be a 2-D QuantizedTensor (num_embeddings, embedding_dim)"
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
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Embedding4bit:
        """Quantize ``embedding.weight``; output dtype ``compute_dtype`` (default: the weight's).

        Raises:
            ValueError: for ``max_norm`` (it rewrites the table in place) or sparse gradients.
        """
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("Embedding4bit supports neither max_norm nor sparse embeddings")
        qweight = quantize_4bit(embedding.weight, blocksize, quant_type, double_quant)
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
                f"index out of range in Embedding4bit (num_embeddings={self.num_embeddings})"
            )
        columns = torch.arange(self.embedding_dim, device=ids.device)
        flat = ids.to(torch.int64).unsqueeze(-1) * self.embedding_dim + columns
        return dequantize_4bit_elements(self.qweight, flat, self.compute_dtype)

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
