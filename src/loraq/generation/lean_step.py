"""A decode step without transformers' per-layer machinery, for the Llama family.

One decode step feeds one token per row. Through ``model(...)`` it runs transformers' mask
builder, rotary embedding, decorators and hub-kernel wrappers around every layer; for a small
model that Python costs as much as the arithmetic. :class:`LeanDecodeStep` runs the same
computation as a flat loop over the decoder layers: the causal mask is the batch's padding mask,
the rotary tables are computed once per step, keys and values are written into buffers with
room to grow (not copied whole at every step), and every projection, MLP and embedding is still
called as the model's own module, so LoRA layers, mixed-adapter rows, quantized or GGUF bases and
``modules_to_save`` copies behave exactly as under ``model(...)``.

Which models: transformers' ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` causal LMs whose
layers all use full attention (no sliding window), read from the model's structure; anything
else returns None from :func:`lean_decode_step` and the caller keeps ``model(...)``. The
result equals transformers' within float rounding (the same operations, the same attention
kernel; tests compare the logits and the greedy tokens).

``LORAQ_LEAN_DECODE`` (spelled as every switch, :mod:`loraq.core.switches`): ``auto`` (default)
uses it where the model qualifies, ``off`` never, ``on`` raises :class:`LeanDecodeUnsupported`
for a model that does not qualify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.switches import read_switch
from ..native.lean_layer import run_layer
from .lean_model import is_rms_norm, rms_norm, rotate, signed_sin
from .native_step import native_layers

__all__ = [
    "LEAN_DECODE_ENV",
    "MODEL_TYPES",
    "LeanDecodeStep",
    "LeanDecodeUnsupported",
    "lean_decode_step",
]

#: Environment variable choosing ``auto`` / ``off`` / ``on`` (see the module docstring).
LEAN_DECODE_ENV = "LORAQ_LEAN_DECODE"
#: transformers ``model_type`` values whose decoder layers the lean step runs.
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
#: Least number of free positions a grown key/value buffer gets (else half its length): a step
#: then writes one position instead of copying the whole cache, as ``torch.cat`` does.
MIN_ROOM = 64


class LeanDecodeUnsupported(UserError, ValueError):
    """``LORAQ_LEAN_DECODE=on`` for a model the lean step cannot run; the message says why."""


@dataclass(frozen=True)
class _Layer:
    """One decoder layer, its attention module and attention shape. The projections, norms and
    MLP are looked up at every step: loading an adapter or ``modules_to_save`` replaces them."""

    layer: nn.Module
    attn: nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' RMSNorm, inline (its module call costs more than its arithmetic here);
    # anything else in a norm's place (a modules_to_save copy, another norm) runs as a module
    if not is_rms_norm(module):
        return module(x)
    return rms_norm(x, module.weight, module.variance_epsilon)


def _why_not(model: nn.Module) -> str | None:
    """None if the lean step can run ``model``, else the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "the model does not have the model.{embed_tokens,layers,norm,rotary_emb} layout"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "some layers use sliding-window attention"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r}"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if attn is None or not all(hasattr(attn, p) for p in parts):
            return "a decoder layer without q/k/v/o projections"
        if not all(
            hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")
        ):
            return "a decoder layer without the Llama layout"
    return None


def _layer(layer: nn.Module, config) -> _Layer:
    attn = layer.self_attn
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return _Layer(layer, attn, heads, kv_heads, attn.head_dim, attn.scaling)


class _Room:
    """Key/value buffers with free positions after the cached ones, one per cache tensor.

    A cache tensor that is the front of its buffer gets the new position written in place; any
    other (the first step, or after the batch joined or dropped rows, which build new tensors)
    is copied into a new buffer with room. Returned tensors are views of the buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def reserve(self, key: tuple[int, str], old: torch.Tensor) -> torch.Tensor:
        """The buffer of ``key``: ``old`` (``(rows, heads, length, dim)``) at its front and room
        for at least one more position after it."""
        rows, heads, length, dim = old.shape
        buffer = self._buffers.get(key)
        if buffer is None or not _is_front(old, buffer) or length == buffer.shape[2]:
            buffer = old.new_empty(rows, heads, length + max(MIN_ROOM, length // 2), dim)
            buffer[:, :, :length] = old
            self._buffers[key] = buffer
        return buffer

    def append(self, key: tuple[int, str], old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``torch.cat([old, new], dim=2)`` for ``(rows, heads, length, dim)`` tensors."""
        length = old.shape[2]
        buffer = self.reserve(key, old)
        buffer[:, :, length : length + 1] = new
        return buffer[:, :, : length + 1]

    def clear(self) -> None:
        """Let the buffers go (the batch is empty)."""
        self._buffers.clear()


def _is_front(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    # a live buffer's memory belongs to it alone: the same start and strides mean a front view
    return (
        view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2]
        and view.shape[3] == buffer.shape[3]
    )


class LeanDecodeStep:
    """The decode step of a Llama-family causal LM (see the module doc).

    Call it with the rows' next tokens, their position ids, the padding mask over the cache
    *including* the new column, and the transformers ``DynamicCache`` of the running rows (one
    layer per decoder layer, keys and values ``(rows, kv_heads, length, head_dim)``); it appends
    the new keys and values to the cache and returns float32 logits ``(rows, vocab)``.
    """

    def __init__(self, model: nn.Module) -> None:
        why = _why_not(model)
        if why is not None:
            raise LeanDecodeUnsupported(
                f"{LEAN_DECODE_ENV}=on but the lean decode step cannot run this model: {why}"
            )
        self.model = model
        self._layers = [_layer(layer, model.config) for layer in model.model.layers]
        self._room = _Room()
        # layers the compiled layer runs, where they qualify (None: every layer in PyTorch)
        self._native = native_layers(model)

    def release(self) -> None:
        """Free the key/value buffers kept for the running rows (call when none are left)."""
        self._room.clear()
        if self._native is not None:
            self._native.clear()

    @torch.no_grad()
    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache
    ) -> torch.Tensor:
        model, inner, rows = self.model, self.model.model, ids.shape[0]
        x = inner.embed_tokens(ids.view(rows, 1))
        cos, sin = inner.rotary_emb(x, positions.view(rows, 1))
        compiled = None
        if self._native is not None and self._native.runs(x):
            x = x.clone(memory_format=torch.contiguous_format)  # compiled layers write into it
            compiled = (
                cos.reshape(rows, -1).contiguous(),
                sin.reshape(rows, -1).contiguous(),
                mask.to(torch.uint8).contiguous(),
            )
        cos, sin = cos.unsqueeze(1), signed_sin(sin.unsqueeze(1))
        keep = mask.view(rows, 1, 1, -1).bool()
        for index, (spec, kv) in enumerate(zip(self._layers, cache.layers)):
            if compiled is not None and self._compiled_layer(spec, kv, index, x, *compiled):
                continue
            layer = spec.layer
            h = _rms_norm(layer.input_layernorm, x)
            x = x + self._attention(spec, h, cos, sin, keep, kv, index)
            x = x + layer.mlp(_rms_norm(layer.post_attention_layernorm, x))
        x = _rms_norm(inner.norm, x)
        return model.lm_head(x).view(rows, -1).float()

    def _compiled_layer(self, spec: _Layer, kv, index: int, x, cos, sin, keep) -> bool:
        """Run decoder layer ``index`` on ``x`` in place through the compiled layer; False
        (nothing done) where it does not qualify (:mod:`loraq.generation.native_step`)."""
        rows, length = x.shape[0], kv.keys.shape[2]
        if keep.shape[1] != length + 1 or kv.keys.dtype != torch.float32:
            return False
        keys = self._room.reserve((index, "keys"), kv.keys)
        values = self._room.reserve((index, "values"), kv.values)
        shape = (spec.heads, spec.kv_heads, spec.head_dim, spec.scaling)
        layer_spec = self._native.spec(spec.layer, shape, keys, values, rows)
        if layer_spec is None:
            return False
        run_layer(layer_spec, x.view(rows, -1), length, cos, sin, keep)
        kv.keys, kv.values = keys[:, :, : length + 1], values[:, :, : length + 1]
        return True

    def _attention(self, spec: _Layer, h, cos, sin, keep, kv, index: int) -> torch.Tensor:
        attn, rows, dim = spec.attn, h.shape[0], spec.head_dim
        q = attn.q_proj(h).view(rows, spec.heads, 1, dim)
        k = attn.k_proj(h).view(rows, spec.kv_heads, 1, dim)
        v = attn.v_proj(h).view(rows, spec.kv_heads, 1, dim)
        q_norm = getattr(attn, "q_norm", None)
        if q_norm is not None:  # Qwen3: a norm over each head
            q, k = _rms_norm(q_norm, q), _rms_norm(attn.k_norm, k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        kv.keys = self._room.append((index, "keys"), kv.keys, k)
        kv.values = self._room.append((index, "values"), kv.values, v)
        # one query token per row: its heads grouped under their key/value head, as
        # transformers' sdpa path does, so no key or value is repeated
        q = q.view(rows, spec.kv_heads, spec.heads // spec.kv_heads, dim)
        out = F.scaled_dot_product_attention(
            q, kv.keys, kv.values, attn_mask=keep, scale=spec.scaling
        )
        return attn.o_proj(out.reshape(rows, 1, spec.heads * dim))


def lean_decode_step(model: nn.Module) -> LeanDecodeStep | None:
    """The lean step for ``model``, or None where ``LORAQ_LEAN_DECODE`` is ``off`` or the model
    does not qualify under ``auto`` (see the module doc)."""
    switch = read_switch(LEAN_DECODE_ENV)
    if switch == "off" or (switch == "auto" and _why_not(model) is not None):
        return None
    return LeanDecodeStep(model)
