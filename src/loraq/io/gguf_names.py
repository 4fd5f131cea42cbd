"""GGUF naming facts for Llama-family models: tensor names, the q/k row permutation, metadata keys.

llama.cpp names a transformers Llama tensor as follows (``N`` is the layer index)::

    transformers                                  GGUF
    model.embed_tokens.weight                     token_embd.weight
    model.norm.weight                             output_norm.weight
    lm_head.weight                                output.weight        (absent when tied)
    model.layers.N.input_layernorm.weight         blk.N.attn_norm.weight
    model.layers.N.post_attention_layernorm.weight  blk.N.ffn_norm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.*     blk.N.attn_{q,k,v,output}.*
    model.layers.N.mlp.{gate,up,down}_proj.*      blk.N.ffn_{gate,up,down}.*

For the ``llama`` architecture (and ``mistral``) llama.cpp's converter reorders the rows of
``q_proj`` and ``k_proj`` from transformers' rotate-half RoPE layout to its interleaved one:
within each head of ``head_dim`` rows, row ``2i`` of GGUF is transformers' row ``i`` and row
``2i+1`` is row ``i + head_dim/2``. :func:`gguf_row_order` gives that order; ``qwen2`` keeps
transformers' order.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "PERMUTED_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "gguf_row_order",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
    "hf_row_order",
]

#: ``general.architecture`` values loraq reads and writes (transformers' Llama-family classes).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2")
#: Architectures whose q/k rows llama.cpp permutes.
PERMUTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral")

_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_to_gguf_name(module: str) -> str | None:
    """GGUF name of a transformers module path (no ``.weight``), or None if it has none."""
    if module in _GLOBAL:
        return _GLOBAL[module]
    match = _HF_LAYER.match(module)
    if match and match.group(2) in _LAYER:
        return f"blk.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def gguf_to_hf_name(name: str) -> str | None:
    """transformers module path of a GGUF tensor name without its suffix, or None."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    match = _GGUF_LAYER.match(name)
    if match and match.group(2) in _LAYER_BACK:
        return f"model.layers.{match.group(1)}.{_LAYER_BACK[match.group(2)]}"
    return None


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
    if arch not in PERMUTED_ARCHITECTURES:
        return None
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None
