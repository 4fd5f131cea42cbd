"""A Llama-family causal LM for serving, without transformers' modeling machinery.

Importing transformers' Llama modeling pulls in ``torch._dynamo``, ``torch.distributed.tensor``
and sympy: seconds of start-up and about 200 MB of memory before a weight is read. A GGUF base
served by ``loraq serve`` needs none of it: :class:`LeanLlamaForCausalLM` is the same network
as transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` (the same
float32 products in the same order, the same module names), so adapters, PEFT files,
mixed-adapter batches, :mod:`loraq.generation.lean_step` and ``DecodeBatch`` work on it
unchanged. Its RMSNorm and RoPE are the pure functions :func:`rms_norm` and :func:`rotate`,
which the lean decode step uses too.

=====================  =======================================================================
part                   as transformers computes it
=====================  =======================================================================
``embed_tokens``       the embedding (``nn.Embedding`` or the GGUF table put in its place)
``rotary_emb``         default RoPE: ``theta ** (-2i / head_dim)``, cos/sin in float32
each layer             RMSNorm -> attention (q/k/v/o, Qwen3's per-head q/k norms, grouped
                       key/value heads, scaled dot-product attention) -> residual ->
                       RMSNorm -> SiLU-gated MLP -> residual
the mask               causal over the new positions and the cache, and the padding mask
``lm_head``            on the last ``logits_to_keep`` positions (0: all)
=====================  =======================================================================

Which models (:func:`lean_config` returns None for the rest, and the caller builds
transformers' class): ``LlamaConfig``, ``Qwen2Config`` and ``Qwen3Config`` arguments with
default RoPE and full attention, i.e. no argument outside :data:`CONFIG_FIELDS`.
``LORAQ_LEAN_MODEL`` (a switch of :mod:`loraq.core.switches`): ``auto`` (default) builds the
lean model where it applies, ``off`` never, ``on`` raises :class:`LeanModelUnsupported` where
it does not. Tests compare it with transformers' model on the same GGUF file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.switches import read_switch

__all__ = [
    "CONFIG_FIELDS",
    "CONFIG_MODEL_TYPES",
    "LEAN_MODEL_ENV",
    "LeanConfig",
    "LeanLlamaForCausalLM",
    "LeanModelUnsupported",
    "LeanOutput",
    "RMSNorm",
    "is_rms_norm",
    "rms_norm",
    "rotate",
    "signed_sin",
    "attention_mask_4d",
    "build_lean_model",
    "lean_config",
]

#: Environment variable choosing ``auto`` / ``off`` / ``on`` (see the module docstring).
LEAN_MODEL_ENV = "LORAQ_LEAN_MODEL"
#: transformers config class name -> the ``model_type`` the lean model runs as.
CONFIG_MODEL_TYPES = {"LlamaConfig": "llama", "Qwen2Config": "qwen2", "Qwen3Config": "qwen3"}


class LeanModelUnsupported(UserError, ValueError):
    """``LORAQ_LEAN_MODEL=on`` for a model the lean model cannot be; the message says why."""


@dataclass
class LeanConfig:
    """The hyperparameters the lean model reads, under transformers' attribute names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    _name_or_path: str = ""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """The attributes as a dict (as transformers configs offer)."""
        return asdict(self)


#: Config arguments the lean model understands; any other means a feature it does not have.
CONFIG_FIELDS = frozenset(f.name for f in fields(LeanConfig)) - {"model_type", "_name_or_path"}


def lean_config(config_class: str, arguments: dict[str, Any]) -> LeanConfig | str:
    """The lean model's config for transformers' ``config_class(**arguments)``, or the reason
    it has none (a string)."""
    model_type = CONFIG_MODEL_TYPES.get(config_class)
    if model_type is None:
        return f"{config_class} is not one of {sorted(CONFIG_MODEL_TYPES)}"
    extra = sorted(set(arguments) - CONFIG_FIELDS)
    if extra:
        return f"config arguments {extra} are not the lean model's"
    if arguments.get("vocab_size") is None:
        return "the vocabulary size is unknown"
    return LeanConfig(model_type=model_type, **arguments)


class _LinearSlot(nn.Linear):
    """An ``nn.Linear`` left uninitialised: a place the file's tensor takes (random values
    would be overwritten, and drawing them on the meta device imports torch's compiler)."""

    def reset_parameters(self) -> None:
        """Nothing: the loader puts the file's weights in place."""


class _EmbeddingSlot(nn.Embedding):
    """An ``nn.Embedding`` left uninitialised, as :class:`_LinearSlot`."""

    def reset_parameters(self) -> None:
        """Nothing: the loader puts the file's table in place."""


class RMSNorm(nn.Module):
    """transformers' Llama RMSNorm: ``weight * x / rms(x)``, the statistics in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized ``x``, in ``x``'s dtype."""
        return rms_norm(x, self.weight, self.variance_epsilon)


_TRANSFORMERS_RMS_NORMS = frozenset(
    f"{name}RMSNorm" for name in ("Llama", "Mistral", "Qwen2", "Qwen3")
)


def is_rms_norm(module: nn.Module | None) -> bool:
    """Whether ``module`` computes :func:`rms_norm` with its ``weight`` and
    ``variance_epsilon``: this module's :class:`RMSNorm` or transformers' Llama-family one
    (by class name: matched without importing transformers). Anything else in a norm's place
    (a ``modules_to_save`` copy, another norm) is not."""
    return type(module) is RMSNorm or type(module).__name__ in _TRANSFORMERS_RMS_NORMS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of ``x`` over its last dimension: ``weight * x / rms(x)``
    with the statistics in float32, the result in ``x``'s dtype. Float32 inputs take
    ``F.rms_norm``, the same float32 products in one call."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE tables: ``(cos, sin)`` of shape ``(rows, positions, head_dim)``."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        dim = config.head_dim
        # computed on the CPU even under a meta-device context (a meta division would
        # import torch's compiler); the loader rebuilds this module outside it anyway
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**exponents), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """cos and sin of ``position_ids`` (``(rows, positions)``), in ``x``'s dtype."""
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, for :func:`rotate`: transformers'
    ``rotate_half(x) * sin`` is then ``x.roll(half, -1) * signed``, the same products in two
    operations instead of five."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it, ``x * cos + rotate_half(x) * sin``, with ``signed``
    from :func:`signed_sin` (``(-a) * s`` and ``a * (-s)`` are the same float)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and Qwen3's per-head q/k norms)."""

    def __init__(self, config: LeanConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        hidden, dim = config.hidden_size, self.head_dim
        bias = config.model_type == "qwen2"
        self.q_proj = _LinearSlot(hidden, self.heads * dim, bias=bias)
        self.k_proj = _LinearSlot(hidden, self.kv_heads * dim, bias=bias)
        self.v_proj = _LinearSlot(hidden, self.kv_heads * dim, bias=bias)
        self.o_proj = _LinearSlot(self.heads * dim, hidden, bias=False)
        if config.model_type == "qwen3":
            self.q_norm = RMSNorm(dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        """Attention over the cache and ``x``'s positions (the cache gains them)."""
        rows, length, _ = x.shape
        q = self.q_proj(x).view(rows, length, self.heads, self.head_dim)
        k = self.k_proj(x).view(rows, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(rows, length, self.kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, signed = cos.unsqueeze(1), signed_sin(sin.unsqueeze(1))
        q, k = rotate(q, cos, signed), rotate(k, cos, signed)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, -1))


class MLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _LinearSlot(hidden, inner, bias=False)
        self.up_proj = _LinearSlot(hidden, inner, bias=False)
        self.down_proj = _LinearSlot(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP of ``x``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks, each added to the residual stream."""

    def __init__(self, config: LeanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        """The layer's output for the residual stream ``x``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LeanModel(nn.Module):
    """The decoder stack (transformers' ``model.model``)."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.embed_tokens = _EmbeddingSlot(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class LeanOutput:
    """What :meth:`LeanLlamaForCausalLM.forward` returns (transformers' field names)."""

    logits: torch.Tensor
    past_key_values: Any = None


def attention_mask_4d(
    attention_mask: torch.Tensor | None, rows: int, past: int, length: int, device
):
    """``(rows, 1, length, past + length)`` booleans: causal, padding masked out; a padding
    query still sees itself (its output is unused, and a row with no key would be NaN)."""
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    allowed = keys[None, :] <= queries[:, None]
    if attention_mask is not None:
        allowed = allowed[None] & attention_mask[:, None, :].bool()
        allowed = allowed | (keys[None, :] == queries[:, None])[None]
    else:
        allowed = allowed[None].expand(rows, -1, -1)
    return allowed[:, None]


class LeanLlamaForCausalLM(nn.Module):
    """The causal LM (see the module doc): ``model`` (the stack), ``lm_head``, ``config``."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LeanModel(config)
        self.lm_head = _LinearSlot(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        """The output head."""
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        **unused: Any,
    ) -> LeanOutput:
        """Logits ``(rows, positions, vocab)`` of ``input_ids`` after the cached positions.

        ``past_key_values`` is a transformers ``DynamicCache`` (a new one when None and
        ``use_cache``); ``attention_mask`` covers the cache and the new positions.
        """
        rows, length = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None]
            position_ids = position_ids.expand(rows, -1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(x, position_ids)
        mask = attention_mask_4d(attention_mask, rows, past, length, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return LeanOutput(self.lm_head(x), cache)


def build_lean_model(config_class: str, arguments: dict[str, Any]) -> nn.Module | None:
    """The lean model for transformers' ``config_class(**arguments)`` as ``LORAQ_LEAN_MODEL``
    says (None: build transformers' model); a :data:`loraq.io.gguf_read.ModelBuilder`.

    Raises:
        LeanModelUnsupported: ``LORAQ_LEAN_MODEL=on`` and the model is not one it can be.
    """
    switch = read_switch(LEAN_MODEL_ENV)
    if switch == "off":
        return None
    config = lean_config(config_class, arguments)
    if isinstance(config, str):
        if switch == "on":
            raise LeanModelUnsupported(f"{LEAN_MODEL_ENV}=on but {config}")
        return None
    return LeanLlamaForCausalLM(config)
