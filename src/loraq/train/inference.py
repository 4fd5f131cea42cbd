"""Loading what a run trained, for eval, generate, merge and export.

:func:`load_trained` finds the base model, task and labels from the run's saved config and
loads the adapter over the same (quantized) base it was trained on; :func:`attach_adapter` is
:func:`loraq.load_adapter` with the run's base options (all or nothing: a failed load leaves no
adapter behind); :func:`load_for_export` loads an adapter over its base for ``loraq export``
(a ``.gguf`` base keeps its blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.gguf_read import gguf_model_file, load_gguf
from ..io.peft_format import (
    BASE_OPTIONS,
    CONFIG_NAME,
    adapter_base_model,
    is_adapter_folder,
    load_adapter,
)
from ..io.quantized import load_quantized
from ..io.safe import FormatError, read_json
from .config import ConfigError, TrainConfig
from .data import collate, pad_id_of, read_records, tokenize_records
from .modeling import (
    load_model,
    load_tokenizer,
    quiet_transformers,
    resolve_device,
    resolve_model_path,
)
from .outputs import read_run_config


def attach_adapter(
    model: nn.Module,
    adapter: str | Path,
    run: TrainConfig | None,
    dense_base: bool = False,
    adapter_name: str = "default",
) -> nn.Module:
    """Load ``adapter`` onto ``model`` (as ``adapter_name``) with :func:`loraq.load_adapter`.
    When the run trained it over a quantized base (QLoRA) the base is quantized the same way
    first (the run's :data:`~loraq.io.peft_format.BASE_OPTIONS`), so eval sees what training
    saw; ``dense_base`` skips that and uses the float base instead."""
    quantized = run is not None and run.lora.quant is not None and not dense_base
    options = {k: getattr(run.lora, k) for k in BASE_OPTIONS} if quantized else {}
    return load_adapter(model, adapter, adapter_name, **options)


def adapter_base(adapter: str | Path, run: TrainConfig | None = None) -> str | None:
    """The base model of an adapter folder: the one its run trained on (``model.path`` of
    ``run``, else of the run config saved beside it), else the one its ``adapter_config.json``
    names, else None."""
    run = run if run is not None else read_run_config(Path(adapter))
    if run is not None and run.model.path:
        return run.model.path
    try:
        return adapter_base_model(adapter)
    except FormatError as err:
        raise ConfigError(str(err)) from None


def load_trained(
    model_path: str | None = None,
    adapter: str | Path | None = None,
    task: str | None = None,
    dense_base: bool = False,
    device: str = "auto",
) -> tuple[nn.Module, Any, TrainConfig | None]:
    """Load a model for eval/generate/merge: ``(model, tokenizer, run config or None)``.

    ``adapter`` is an adapter folder (PEFT layout; a loraq run also leaves its config there, so
    the base model, task and labels are found without being named) or a full model folder
    written by ``method: full``. Without ``adapter`` the plain ``model_path`` model is loaded.
    A QLoRA adapter is loaded over the same quantized base it was trained with, unless
    ``dense_base``. The model is moved to ``device`` (see :func:`resolve_device`).
    """
    run = None
    is_full = False
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_dir():
            raise ConfigError(f"adapter folder '{adapter}' does not exist")
        run = read_run_config(adapter)
        is_full = (adapter / "config.json").is_file() and not is_adapter_folder(adapter)
        if not is_full and not is_adapter_folder(adapter):
            raise ConfigError(f"'{adapter}' holds no {CONFIG_NAME}: not an adapter folder")
        if is_full:
            model_path = str(adapter)
        elif model_path is None:
            model_path = adapter_base(adapter, run)
        if task is None and run is not None:
            task = run.model.task
        elif task is not None and run is not None and task != run.model.task:
            raise ConfigError(f"'{adapter}' was trained for task {run.model.task}, not {task}")
    if not model_path:
        raise ConfigError("no base model: pass --model (the adapter does not name its base)")
    task = task or "causal-lm"
    tokenizer = load_tokenizer(model_path)
    labels = run.data.labels if run is not None and task == "seq-cls" else None
    if task == "seq-cls" and not labels:
        from transformers import AutoConfig

        with quiet_transformers():
            hf_config = AutoConfig.from_pretrained(str(resolve_model_path(model_path)))
        labels = [hf_config.id2label[i] for i in sorted(hf_config.id2label)]
    model, _ = load_model(model_path, task, labels, pad_id_of(tokenizer))
    if adapter is not None and not is_full:
        try:
            model = attach_adapter(model, adapter, run, dense_base)
        except ValueError as err:  # loraq.io.FormatError and LoraConfig errors
            raise ConfigError(f"cannot load adapter '{adapter}' onto {model_path}: {err}") from None
    model.to(resolve_device(device)).eval()
    return model, tokenizer, run


def load_for_export(adapter: str | Path, base: str | None = None) -> nn.Module:
    """The causal LM adapter ``adapter`` over its base (``base``, a model folder or ``.gguf``
    file, else :func:`adapter_base`), ready for :func:`loraq.io.gguf_write.export_gguf`. A
    GGUF base is read with :func:`loraq.load_gguf` and keeps its blocks; a folder base is
    loaded as :func:`load_trained` loads it."""
    adapter = Path(adapter)
    if not is_adapter_folder(adapter):
        raise ConfigError(f"'{adapter}' holds no {CONFIG_NAME}: not an adapter folder")
    run = read_run_config(adapter)
    base = base or adapter_base(adapter, run)
    if not base:
        raise ConfigError(f"'{adapter}' does not name its base model; pass --base")
    gguf_file = gguf_model_file(base)
    if gguf_file is None:
        model, _, _ = load_trained(model_path=base, adapter=adapter, task="causal-lm")
        return model
    model, _ = load_gguf(gguf_file, tokenizer=False)
    return attach_adapter(model, adapter, run)


def original_weights(path: str | None, model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights a quantized base was made from, for ``merge_into="original"``: the
    model at ``path`` (a folder or ``pkg:NAME``), or the folder ``model`` was loaded from."""
    from ..io.merged_export import read_float_weights
    from ..io.model_folder import source_folder

    folder = resolve_model_path(path) if path else source_folder(model)
    if folder is None:
        raise ConfigError("--into original needs --original MODEL_DIR (the float base weights)")
    return read_float_weights(folder)


#: How many of a run's held-out examples ``loraq merge`` measures a merge on.
CALIBRATION_EXAMPLES = 8


def calibration_inputs(
    run: TrainConfig | None, tokenizer: Any, model: nn.Module
) -> dict[str, torch.Tensor] | None:
    """The first :data:`CALIBRATION_EXAMPLES` records of the run's eval (else train) data as
    model inputs, to measure a merge on real text; None without a run or readable data (the
    merge then falls back to random token ids)."""
    path = (run.data.eval or run.data.train) if run is not None else None
    if not path:
        return None
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    labels = run.data.labels or [id2label[i] for i in sorted(id2label)]
    try:
        records = read_records(path, run.data.format)[:CALIBRATION_EXAMPLES]
        examples = tokenize_records(records, run, tokenizer, labels, "calibration")
    except (OSError, ValueError):  # the data moved or changed since training
        return None
    if not examples:
        return None
    batch = collate(examples, pad_id_of(tokenizer))
    batch.pop("labels", None)
    return batch


def load_with_adapters(
    model_path: str | None, adapters: dict[str, str | Path], dense_base: bool = False
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the base (``model_path``, else the first adapter's base) with each
    adapter of ``adapters`` loaded under its name, as :func:`load_trained` loads one (a QLoRA
    adapter quantizes the base as its run did, unless ``dense_base``). A ``.gguf`` base keeps
    its blocks; a 4-/8-bit checkpoint folder (``quantization_config`` in its ``config.json``,
    written by :func:`loraq.save_quantized` or bitsandbytes) is read by :func:`loraq.load_quantized`.
    Adapters are loaded in order; the last one loaded is active."""
    first = next(iter(adapters.values()), None)
    if model_path is None and first is not None:
        if not Path(first).is_dir():
            raise ConfigError(f"adapter folder '{first}' does not exist")
        model_path = adapter_base(first)
    quantized = bool(model_path) and _is_quantized_folder(model_path)
    if quantized:
        folder = resolve_model_path(str(model_path))
        with quiet_transformers():
            model = load_quantized(folder).to(resolve_device("auto"))
        tokenizer = load_tokenizer(folder)
    else:
        model, tokenizer, _ = load_trained(model_path=model_path, task="causal-lm")
    for name, folder in adapters.items():
        folder = Path(folder)
        if not is_adapter_folder(folder):
            raise ConfigError(f"'{folder}' holds no {CONFIG_NAME}: not an adapter folder")
        try:
            # over a base stored quantized, the run's quantization options are already applied
            run = read_run_config(folder)
            attach_adapter(model, folder, run, dense_base or quantized, adapter_name=name)
        except ValueError as err:
            raise ConfigError(f"cannot load adapter '{folder}' onto {model_path}: {err}") from None
    return model.eval(), tokenizer


def _is_quantized_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return config.is_file() and "quantization_config" in read_json(config)
    except FormatError:
        return False
