"""The base model and tokenizer for ``loraq serve``, from what ``--base`` points at.

=====================================  ===============================================
``--base``                             loaded with
=====================================  ===============================================
folder with ``quantization_config``    :func:`loraq.load_quantized` (4-bit/8-bit base)
other transformers folder              ``AutoModelForCausalLM.from_pretrained``
``*.gguf`` file                        :func:`loraq.load_gguf` (blocks kept quantized; Llama and
                                       Qwen 2/3 as :mod:`loraq.generation.lean_model`)
=====================================  ===============================================

The tokenizer is read from the same folder (for a GGUF file: converted from the file's
vocabulary), or from ``--tokenizer`` when given (needed for a GGUF file without a vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..generation.lean_model import build_lean_model
from ..io.gguf_read import load_gguf
from ..io.quantized import load_quantized


class BaseLoadError(ValueError):
    """``--base`` cannot be served; the message says why."""


def load_base(
    path: str | Path, quant: str | None = None, tokenizer: str | Path | None = None
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``path``; ``quant`` (a ``LoraConfig.quant`` format) quantizes a
    dense base; ``tokenizer`` names a folder to read the tokenizer from instead of the base's own."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        model, own = _load_gguf(path, quant, own_tokenizer=tokenizer is None)
    elif (path / "config.json").is_file():
        model = _load_folder(path, quant)
        own = None if tokenizer is not None else _folder_tokenizer(path, "--base")
    else:
        raise BaseLoadError(
            f"--base {path}: expected a transformers folder with config.json or a .gguf file"
        )
    if tokenizer is not None:
        own = _folder_tokenizer(Path(tokenizer), "--tokenizer")
    if own is None:
        raise BaseLoadError(
            f"--base {path}: the GGUF file has no vocabulary; pass --tokenizer FOLDER"
        )
    return model.eval(), own


def _load_folder(path: Path, quant: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config:
        return load_quantized(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if quant is not None:
        from ..model.config import LoraConfig
        from ..model.quantize import quantize_model

        quantize_model(model, LoraConfig(targets="all-linear", quant=quant))
    return model


def _folder_tokenizer(path: Path, flag: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise BaseLoadError(f"{flag} {path}: no usable tokenizer in the folder: {err}") from err


def _load_gguf(path: Path, quant: str | None, own_tokenizer: bool):
    if quant is not None:
        raise BaseLoadError(
            f"--quant {quant} applies to dense bases; --base {path.name} is already quantized"
        )
    try:
        return load_gguf(path, tokenizer=own_tokenizer, build=build_lean_model)
    except (OSError, ValueError) as err:
        raise BaseLoadError(f"--base {path}: {err}") from err


def context_length(model: nn.Module, default: int = 2048) -> int:
    """The model's context length from its config (``max_position_embeddings``)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)
