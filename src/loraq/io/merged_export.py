"""Whole-model files: a merged dense export, and 4-/8-bit checkpoints in transformers' layout.

``export_merged`` folds the active adapter into a dense copy of the model and writes a folder
that ``transformers.AutoModel*.from_pretrained`` loads. ``save_quantized`` / ``load_quantized``
(:mod:`loraq.io.quantized`) keep the base quantized, in the bitsandbytes key layout.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.dtypes import FLOAT_DTYPES
from ..model.merging import REPORT_ATTR, REPORT_FILE, MergeReport, Original, check_merge_target
from ..model.surgery import unload
from .model_folder import copy_tokenizer_files, source_folder
from .quantized import write_quantized_files
from .safe import (
    atomic_save_safetensors,
    atomic_write_json,
    check_replaceable,
    model_weight_files,
    read_json,
    read_safetensors,
    staged_folder,
)

#: dtypes ``export_merged`` can write.
EXPORT_DTYPES = FLOAT_DTYPES


def _drop_quantization_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    for attr in ("is_quantized", "hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def export_merged(
    model: nn.Module,
    path: str | os.PathLike[str],
    dtype: str = "float32",
    *,
    merge_into: str = "dequantized",
    original: Original | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Write the model with the active adapter merged in; returns the folder.

    The user's model is not changed: a deep copy is merged into the base ``merge_into`` names
    (see :mod:`loraq.model.merging`): ``"dequantized"`` (a 4-/8-bit base becomes dense float32; exact,
    the default), ``"original"`` (onto ``original``'s pre-quantization weights, a model or state
    dict) or ``"requantize"`` (the merged base stays in its 4-/8-bit format and is written as
    :func:`loraq.save_quantized` writes it). Dense merges happen in float32, then the weights are
    cast once to ``dtype``. For a transformers model the folder holds ``config.json`` (without
    ``quantization_config`` when dense), ``model.safetensors`` and the tokenizer files of the
    base's folder when it came from one, so ``AutoModel*.from_pretrained(path)`` loads it. Other
    modules get ``model.safetensors`` only. ``merge_report.json`` records the merge's error in
    output space (:class:`~loraq.model.merging.MergeReport`) when a calibration batch was given or
    could be made (a model with ``config.vocab_size``).

    Nothing is half-done: the arguments, ``original`` and ``path`` (absent or a folder) are
    checked before the merge; the folder is staged and published whole, so a failure (a full
    disk: ``OSError(ENOSPC)`` naming ``path``) leaves no partial folder and ``model`` unchanged.

    Args:
        model: a model with loraq adapters (or a plain / quantized model).
        path: output folder; written to a temporary sibling and moved into place.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (dense merges).
        merge_into, original, calibration: as for :func:`loraq.unload`.
        tokenizer: saved into the folder with the weights (``save_pretrained``), if given.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"export_merged: dtype={dtype!r} is invalid; expected one of {list(EXPORT_DTYPES)}"
        )
    check_merge_target(merge_into, original)
    check_replaceable(path, folder=True)
    # Dense merges happen in float32 even over a half-precision base, then round once to
    # ``dtype``; a dequantized GPT-2 Conv1D stays a Conv1D (each quantized layer records it).
    merge_dtype = None if merge_into == "requantize" else torch.float32
    work = unload(
        copy.deepcopy(model),
        merge_into=merge_into,
        original=original,
        calibration=calibration,
        merge_dtype=merge_dtype,
    )
    report: MergeReport = getattr(work, REPORT_ATTR)
    with staged_folder(path) as staging:
        if merge_into == "requantize":
            write_quantized_files(work, staging)
        else:
            _write_dense(work, model, staging, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report.measured:
            atomic_write_json(staging / REPORT_FILE, report.to_dict())
    return Path(path)


def _write_dense(work: nn.Module, model: nn.Module, staging: Path, dtype: str) -> None:
    work.to(EXPORT_DTYPES[dtype])
    _drop_quantization_config(work)
    if hasattr(work, "save_pretrained") and hasattr(work, "config"):
        work.config.dtype = dtype  # what from_pretrained(dtype="auto") will pick
        work.save_pretrained(staging)
        source = source_folder(model)
        if source is not None:
            copy_tokenizer_files(source, staging)
    else:
        atomic_save_safetensors(staging / "model.safetensors", work.state_dict())


def read_float_weights(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a float (not quantized) model folder, for ``merge_into="original"``.

    Raises:
        ValueError: the folder's ``config.json`` has a ``quantization_config`` (its weights are
            not the float weights a base was quantized from).
    """
    config = Path(folder) / "config.json"
    if config.is_file() and "quantization_config" in read_json(config):
        raise ValueError(
            f"{folder}: that model is stored quantized; merge_into='original' needs the float "
            "weights it was quantized from"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in model_weight_files(folder):
        weights.update(read_safetensors(file)[0])
    return weights
