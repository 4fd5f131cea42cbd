"""The base model and tokenizer for ``loraq serve``, from what ``--base`` points at.

=====================================  ===============================================
``--base``                             loaded with
=====================================  ===============================================
folder with ``quantization_config``    :func:`loraq.load_quantized` (4-bit/8-bit base)
other transformers folder              ``AutoModelForCausalLM.from_pretrained``
``*.gguf`` file                        ``loraq.load_gguf`` when this loraq has it
=====================================  ===============================================

The tokenizer is read from the same folder (for a GGUF file: from the file, via the loader).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..io.quantized import load_quantized


class BaseLoadError(ValueError):
    """``--base`` cannot be served; the message says why."""


def load_base(path: str | Path, quant: str | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``path``; ``quant`` ("nf4", "fp4", "int8") quantizes a dense base."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if not (path / "config.json").is_file():
        raise BaseLoadError(
            f"--base {path}: expected a transformers folder with config.json or a .gguf file"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config:
        model = load_quantized(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        if quant is not None:
            from ..config import LoraConfig
            from ..quantize_model import quantize_model

            quantize_model(model, LoraConfig(targets="all-linear", quant=quant))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise BaseLoadError(f"--base {path}: no usable tokenizer in the folder: {err}") from err
    return model.eval(), tokenizer


def _load_gguf(path: Path):
    import loraq

    loader = getattr(loraq, "load_gguf", None)
    if loader is None:
        raise BaseLoadError(
            f"--base {path}: GGUF bases need loraq.load_gguf, which this loraq does not have; "
            "pass a transformers folder or a loraq 4-bit checkpoint"
        )
    loaded = loader(path)
    if isinstance(loaded, tuple):
        return loaded[0].eval(), loaded[1]
    raise BaseLoadError(f"--base {path}: loraq.load_gguf returned no tokenizer")


def context_length(model: nn.Module, default: int = 2048) -> int:
    """The model's context length from its config (``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)
