"""Read a llama.cpp LoRA adapter GGUF (what :func:`~loraq.io.gguf_write.export_gguf` writes, or
llama.cpp's own ``convert_lora_to_gguf.py``) onto a model, as a loraq adapter.

The file holds ``<gguf tensor>.weight.lora_a`` (r, in) and ``.lora_b`` (out, r) per adapted
module, in llama.cpp's names and q/k row order, and ``adapter.lora.alpha``; llama.cpp adds
``alpha / r * lora_b @ lora_a``. Loaded with ``LoraConfig(r, alpha)`` (scaling ``alpha / r``)
and the q/k rows put back in transformers' order, the adapter adds exactly that.

Everything is checked before the model changes (``general.type``, ``adapter.type``, the
architecture against the model's, every tensor's name, shape and finiteness, one rank for all
modules), and a failure while applying restores the model.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.config import LoraConfig
from ..model.surgery import apply
from ..model.transaction import model_transaction
from .adapter_check import check_finite
from .gguf_names import gguf_to_hf_name, hf_row_order, permuted_heads
from .gguf_read import gguf_metadata, open_gguf, tensor_value
from .gguf_write import gguf_architecture
from .safe import FormatError

__all__ = ["load_gguf_adapter"]

_SUFFIXES = (".weight.lora_a", ".weight.lora_b")


def _checked_header(meta: dict[str, Any], arch: str, source: str) -> float:
    """The file's alpha, once it is known to be a LoRA adapter for the architecture ``arch``."""
    if meta.get("general.type") != "adapter":
        raise FormatError(
            f"{source}: general.type is {meta.get('general.type')!r}, not 'adapter' "
            "(a model GGUF is loaded with loraq.load_gguf)"
        )
    if meta.get("adapter.type") != "lora":
        raise FormatError(f"{source}: adapter.type is {meta.get('adapter.type')!r}, not 'lora'")
    if meta.get("general.architecture") != arch:
        raise FormatError(
            f"{source}: general.architecture is {meta.get('general.architecture')!r} "
            f"but the model is {arch!r}"
        )
    alpha = meta.get("adapter.lora.alpha")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise FormatError(f"{source}: adapter.lora.alpha must be a number > 0, got {alpha!r}")
    return float(alpha)


def _factor_pairs(reader: Any, arch: str, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """transformers module path -> {"a": (r, in), "b": (out, r)} in float32."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        suffix = next((s for s in _SUFFIXES if t.name.endswith(s)), None)
        module = gguf_to_hf_name(t.name[: -len(suffix)], arch) if suffix else None
        if module is None:
            raise FormatError(f"{source}: tensor {t.name!r} is not a LoRA factor of a known layer")
        fmt, data, _ = tensor_value(t, source)
        if fmt != "dense":
            raise FormatError(f"{source}: tensor {t.name!r} is {fmt}; LoRA factors are f32/f16")
        check_finite({t.name: data}, source)  # refused as in a PEFT file
        pairs.setdefault(module, {})[suffix[-1]] = data
    for module, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise FormatError(f"{source}: {module} has lora_{set(pair).pop()} but not its partner")
    if not pairs:
        raise FormatError(f"{source}: the file holds no LoRA tensors")
    return pairs


def _checked_rank(model: nn.Module, pairs: dict, source: str) -> int:
    """The one rank of every pair, once each pair fits its module's (out, in)."""
    ranks = set()
    for module, pair in pairs.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise FormatError(f"{source}: the model has no module {module}") from None
        out_f, in_f = layer.weight.shape
        a, b = pair["a"], pair["b"]
        if isinstance(layer, nn.Embedding):  # llama.cpp's flipped pair: a (vocab, r), b (dim, r)
            a, (out_f, in_f) = a.t(), (in_f, out_f)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, a.shape[0]):
            raise FormatError(
                f"{source}: {module}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not "
                f"fit the layer's (out, in) = ({out_f}, {in_f})"
            )
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise FormatError(f"{source}: the pairs have ranks {sorted(ranks)}; loraq needs one rank")
    return ranks.pop()


def load_gguf_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default"
) -> nn.Module:
    """Add the LoRA adapter in the llama.cpp adapter GGUF at ``path`` to ``model`` (in place).

    ``model`` is the base it was trained on (e.g. from :func:`loraq.load_gguf`, or the
    transformers model). The adapter becomes the active one. Raises :class:`FormatError` naming
    the file and the key or tensor when the file is not a LoRA adapter for this model; the
    model is then unchanged.
    """
    source = str(path)
    reader = open_gguf(path)
    arch, cfg = gguf_architecture(model), model.config
    alpha = _checked_header(gguf_metadata(reader), arch, source)
    pairs = _factor_pairs(reader, arch, source)
    r = _checked_rank(model, pairs, source)
    config = LoraConfig(r=r, alpha=alpha, dropout=0.0, targets=sorted(pairs))
    with model_transaction(model):
        apply(model, config, adapter_name, allow_large_rank=True)
        for module, pair in pairs.items():
            layer = model.get_submodule(module)
            a, b = pair["a"], pair["b"]
            heads = permuted_heads(arch, module, cfg.num_attention_heads, cfg.num_key_value_heads)
            if heads is not None:  # llama.cpp's interleaved q/k rows back to transformers'
                b = b[hf_row_order(b.shape[0], heads)]
            with torch.no_grad():
                if adapter_name in layer.lora_embedding_A:  # stored flipped, see _checked_rank
                    layer.lora_embedding_A[adapter_name].copy_(a.t())
                    layer.lora_embedding_B[adapter_name].copy_(b)
                    continue
                layer.lora_A[adapter_name].weight.copy_(a)
                layer.lora_B[adapter_name].weight.copy_(b)
    return model
