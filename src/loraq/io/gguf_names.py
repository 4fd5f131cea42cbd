"""THE table of GGUF architectures loraq reads and writes: one :class:`Architecture` row each.

A row holds every per-architecture fact: the transformers config class and model types, how
llama.cpp names each tensor, whether it reorders the q/k rows, the offset its norms carry, the
embedding scale, and the hyperparameters beyond the common ones (soft-capping, sliding window).
Everything else (reader, writer, hyperparameter checks, adapter files) asks this table.

Tensor names (``N`` is the layer index)::

    transformers                                  GGUF
    model.embed_tokens.weight                     token_embd.weight
    model.norm.weight                             output_norm.weight
    lm_head.weight                                output.weight        (absent when tied)
    model.layers.N.<module>.*                     blk.N.<row.layer_tensors[module]>.*

q/k rows: for ``llama`` (and ``mistral``) llama.cpp's converter reorders the rows of ``q_proj``
and ``k_proj`` from transformers' rotate-half RoPE layout to its interleaved one: within each head
of ``head_dim`` rows, row ``2i`` of GGUF is transformers' row ``i`` and row ``2i+1`` is row
``i + head_dim/2`` (:func:`gguf_row_order`). The others use llama.cpp's NEOX RoPE, which is
transformers' layout, and keep the order.

Fused projections: Phi-3's ``qkv_proj`` and ``gate_up_proj`` are fused in transformers as in
llama.cpp (``attn_qkv``; ``ffn_up`` holding gate then up), so they map one to one.

Norm offsets: Gemma's RMSNorm scales by ``1 + w``; llama.cpp stores ``w + 1`` and scales by it,
so each norm weight gains :attr:`Architecture.norm_offset` on the way out and loses it on the
way in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from .safe import FormatError

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "Architecture",
    "Hyperparameter",
    "architecture",
    "architecture_of_model_type",
    "gguf_row_order",
    "gguf_to_hf_name",
    "hf_row_order",
    "hf_to_gguf_name",
    "permuted_heads",
]


@dataclass(frozen=True)
class Hyperparameter:
    """An architecture-specific ``{arch}.<key>`` <-> ``config.<attribute>`` (written when the
    config's value is not None, read when the file has the key)."""

    key: str
    attribute: str
    kind: type  # int or float


_ATTENTION = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma 2/3 norm before and after both the attention and the MLP.
_GEMMA_NORMS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_PHI3 = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_SLIDING_WINDOW = Hyperparameter("attention.sliding_window", "sliding_window", int)
_SOFTCAPS = (
    Hyperparameter("attn_logit_softcapping", "attn_logit_softcapping", float),
    Hyperparameter("final_logit_softcapping", "final_logit_softcapping", float),
)


def _frozen(*maps: dict[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k: v for m in maps for k, v in m.items()})


@dataclass(frozen=True)
class Architecture:
    """One GGUF architecture: everything loraq needs to read and write it."""

    #: ``general.architecture``.
    name: str
    #: transformers config class that builds it.
    config_class: str
    #: transformers ``model_type`` values exported as this architecture.
    model_types: tuple[str, ...]
    #: transformers module under ``model.layers.N`` -> llama.cpp's tensor under ``blk.N``.
    layer_tensors: Mapping[str, str]
    #: llama.cpp reorders q/k rows into interleaved RoPE order.
    permute_qk: bool = False
    #: added to every norm weight in the file (Gemma's ``1 + w``).
    norm_offset: float = 0.0
    #: ``ffn_up`` holds gate and up (rows: twice ``feed_forward_length``).
    fused_gate_up: bool = False
    #: the config takes ``head_dim`` (``attention.key_length``).
    config_head_dim: bool = True
    #: config attributes llama.cpp derives from the head size (Gemma's query scale).
    head_dim_attributes: tuple[str, ...] = ()
    #: ``{arch}.<key>`` hyperparameters beyond the common ones.
    hyperparameters: tuple[Hyperparameter, ...] = ()
    #: the file never holds ``output.weight`` (the head is the embedding).
    always_tied: bool = False
    #: input embeddings are multiplied by ``sqrt(hidden_size)`` (Gemma, in transformers' and
    #: llama.cpp's code alike, not in the stored table).
    scaled_embedding: bool = False
    #: RoPE turns only the first ``rope.dimension_count`` dims of each head (Phi-3 family:
    #: transformers' ``partial_rotary_factor``).
    partial_rotary: bool = False
    #: the RoPE base llama.cpp uses on sliding-window layers (Gemma 3: fixed, not in the file).
    sliding_rope_theta: float | None = None
    _back: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._back.update({v: k for k, v in self.layer_tensors.items()})

    def gguf_layer(self, module: str) -> str | None:
        """llama.cpp's name for a module under ``model.layers.N`` (None: it has none)."""
        return self.layer_tensors.get(module)

    def hf_layer(self, tensor: str) -> str | None:
        """transformers' module for a tensor under ``blk.N`` (None: none)."""
        return self._back.get(tensor)


_LLAMA_LAYERS = _frozen(_LLAMA_NORMS, _ATTENTION, _MLP)
_GEMMA2_LAYERS = _frozen(_GEMMA_NORMS, _ATTENTION, _MLP)
#: The table: one row per ``general.architecture`` loraq reads and writes.
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        row.name: row
        for row in (
            # llama.cpp writes transformers' Mistral as "llama", and reads "mistral" files too.
            Architecture("llama", "LlamaConfig", ("llama", "mistral"), _LLAMA_LAYERS, True),
            Architecture(
                "mistral", "MistralConfig", (), _LLAMA_LAYERS, True, config_head_dim=False
            ),
            Architecture("qwen2", "Qwen2Config", ("qwen2",), _LLAMA_LAYERS),
            Architecture("qwen3", "Qwen3Config", ("qwen3",), _frozen(_LLAMA_LAYERS, _QK_NORMS)),
            Architecture(
                "phi3",
                "Phi3Config",
                ("phi3",),
                _frozen(_PHI3),
                fused_gate_up=True,
                hyperparameters=(_SLIDING_WINDOW,),
                partial_rotary=True,
            ),
            Architecture(
                "gemma2",
                "Gemma2Config",
                ("gemma2",),
                _GEMMA2_LAYERS,
                norm_offset=1.0,
                head_dim_attributes=("query_pre_attn_scalar",),
                hyperparameters=(_SLIDING_WINDOW, *_SOFTCAPS),
                always_tied=True,
                scaled_embedding=True,
            ),
            Architecture(
                "gemma3",
                "Gemma3TextConfig",
                ("gemma3_text",),
                _frozen(_GEMMA2_LAYERS, _QK_NORMS),
                norm_offset=1.0,
                head_dim_attributes=("query_pre_attn_scalar",),
                hyperparameters=(_SLIDING_WINDOW,),
                always_tied=True,
                scaled_embedding=True,
                sliding_rope_theta=10000.0,
            ),
        )
    }
)
#: ``general.architecture`` values loraq reads and writes.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def architecture(name: str, source: str = "GGUF") -> Architecture:
    """The row of ``general.architecture`` ``name``; FormatError listing the supported ones."""
    row = ARCHITECTURES.get(name)
    if row is None:
        raise FormatError(
            f"{source}: general.architecture {name!r} is not supported; loraq reads and writes "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return row


def architecture_of_model_type(model_type: str | None) -> Architecture:
    """The row a transformers ``model_type`` is exported as; FormatError listing them."""
    for row in ARCHITECTURES.values():
        if model_type in row.model_types:
            return row
    types = sorted(t for row in ARCHITECTURES.values() for t in row.model_types)
    raise FormatError(
        f"GGUF export: transformers model type {model_type!r} is not supported; loraq writes "
        f"{', '.join(types)}"
    )


def hf_to_gguf_name(module: str, arch: str = "llama") -> str | None:
    """GGUF name of a transformers module path (no ``.weight``), or None if it has none."""
    if module in _GLOBAL:
        return _GLOBAL[module]
    match = _HF_LAYER.match(module)
    layer = architecture(arch).gguf_layer(match.group(2)) if match else None
    return f"blk.{match.group(1)}.{layer}" if layer else None


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """transformers module path of a GGUF tensor name without its suffix, or None."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    match = _GGUF_LAYER.match(name)
    module = architecture(arch).hf_layer(match.group(2)) if match else None
    return f"model.layers.{match.group(1)}.{module}" if module else None


def gguf_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Index ``p`` with ``gguf_rows = hf_rows[p]`` for a q/k projection of ``n_head`` heads."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def hf_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Index ``p`` with ``hf_rows = gguf_rows[p]`` (the inverse of :func:`gguf_row_order`)."""
    return torch.argsort(gguf_row_order(rows, n_head))


def permuted_heads(arch: str, module: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute ``module``'s rows over under ``arch`` (None: no permutation)."""
    if not architecture(arch).permute_qk:
        return None
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None
