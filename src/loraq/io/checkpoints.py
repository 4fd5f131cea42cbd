"""Whole-model files: a merged dense export, and 4-/8-bit checkpoints in transformers' layout.

``export_merged`` folds the active adapter into a dense copy of the model and writes a folder
that ``transformers.AutoModel*.from_pretrained`` loads. ``save_quantized`` / ``load_quantized``
(:mod:`loraq.io.quantized`) keep the base quantized, in the bitsandbytes key layout.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..model import unload
from ..quantize_model import dequantize_model
from .safe import atomic_save_safetensors, staged_folder

#: dtypes ``export_merged`` can write.
EXPORT_DTYPES = FLOAT_DTYPES
#: Files a tokenizer may consist of; copied next to an export when the base came from a folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _drop_quantization_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    for attr in ("is_quantized", "hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def source_folder(model: nn.Module) -> Path | None:
    """The local folder the base model was loaded from (``config._name_or_path``), if any."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if name and os.path.isdir(str(name)):
        return Path(str(name))
    return None


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` to ``target``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def export_merged(model: nn.Module, path: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Write a dense model with the active adapter merged in; returns the folder.

    The user's model is not changed: a deep copy is dequantized (a 4-/8-bit base becomes dense
    float32), merged in float32, cast to ``dtype`` and saved. For a transformers model the folder
    holds ``config.json`` (without ``quantization_config``), ``model.safetensors`` and the
    tokenizer files of the base's folder when it came from one, so
    ``AutoModel*.from_pretrained(path)`` loads it. Other modules get ``model.safetensors`` only.

    Args:
        model: a model with loraq adapters (or a plain / quantized model).
        path: output folder; written to a temporary sibling and moved into place.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"export_merged: dtype={dtype!r} is invalid; expected one of {list(EXPORT_DTYPES)}"
        )
    work = copy.deepcopy(model)
    # A quantized base becomes dense before the merge, as the module the model class expects
    # (a GPT-2 Conv1D stays a Conv1D: each quantized layer records its dense layout).
    dequantize_model(work, torch.float32)
    # Merge in float32 even over a half-precision base, then round once to the export dtype.
    original_dtypes = {p.dtype for p in work.parameters() if p.is_floating_point()}
    if original_dtypes - {torch.float32}:
        work.float()
    work = unload(work, merge_adapters=True)
    work.to(EXPORT_DTYPES[dtype])
    _drop_quantization_config(work)
    source = source_folder(model)
    with staged_folder(path) as staging:
        if hasattr(work, "save_pretrained") and hasattr(work, "config"):
            work.config.dtype = dtype  # what from_pretrained(dtype="auto") will pick
            work.save_pretrained(staging)
            if source is not None:
                copy_tokenizer_files(source, staging)
        else:
            atomic_save_safetensors(staging / "model.safetensors", work.state_dict())
    return Path(path)
