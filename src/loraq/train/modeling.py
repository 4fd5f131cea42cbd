"""Loading a Hugging Face model for training or inference, and making it trainable.

resolve_model_path  ->  load_tokenizer / load_model  ->  prepare_model (LoRA, QLoRA or full)

A ``model.path`` ending in ``.gguf`` (a file, or ``pkg:NAME/FILE.gguf``) is read by
:func:`loraq.load_gguf`: its quantized blocks stay the frozen base.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.gguf_read import gguf_model_file, load_gguf, load_gguf_tokenizer
from ..io.safe import FormatError
from ..layers.dropout import use_fast_dropout
from ..model.config import LoraConfig
from ..model.summary import summary
from ..model.surgery import apply
from .config import ConfigError, TrainConfig
from .hub import quiet_transformers

#: Classification heads of AutoModelForSequenceClassification models, by attribute name.
HEAD_NAMES = ("classifier", "score")


def resolve_model_path(path: str) -> Path:
    """A model folder from ``model.path``: a local folder, or ``pkg:NAME`` (a package's model)."""
    if path.startswith("pkg:"):
        name = path[4:]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ConfigError(
                f"model.path '{path}': Python package '{name}' is not installed"
            ) from None
        getter = getattr(module, "get_model_path", None)
        folder = getter() if callable(getter) else getattr(module, "MODEL_DIR", None)
        if folder is None:
            raise ConfigError(f"model.path '{path}': package '{name}' has no get_model_path()")
        path = str(folder)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path '{folder}' is not a folder (expected a local HF model)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path '{folder}' has no config.json: not a Hugging Face model")
    return folder


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a local model folder."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        gguf_file = _gguf_file(path)
        if gguf_file is not None:  # a llama.cpp model: its vocabulary and chat template
            return load_gguf_tokenizer(gguf_file)
        return AutoTokenizer.from_pretrained(str(resolve_model_path(str(path))))


def load_model(
    path: str | Path, task: str, labels: list[str] | None = None, pad_id: int | None = None
) -> tuple[nn.Module, list[str]]:
    """Load a float32 model for ``task``; return it and the modules that were newly initialised.

    For ``seq-cls`` the head gets ``len(labels)`` outputs and the label names; modules whose
    weights were missing from the checkpoint (the head, usually) are returned so that the
    caller can train them in full.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    gguf_file = _gguf_file(path)
    if gguf_file is not None:  # blocks stay quantized; only causal LMs come as GGUF
        return _load_gguf_model(path, gguf_file, task), []
    folder = resolve_model_path(str(path))
    with quiet_transformers():
        if task == "seq-cls":
            if not labels:
                raise ConfigError("seq-cls needs label names (data.labels or the training file)")
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                dtype=torch.float32,
                output_loading_info=True,
            )
        elif task == "causal-lm":
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, output_loading_info=True
            )
        else:
            raise ConfigError(f"model.task must be 'causal-lm' or 'seq-cls', got {task!r}")
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())})
    return model, new_modules


def _gguf_file(path: str | Path) -> Path | None:
    try:
        return gguf_model_file(path)
    except FileNotFoundError as err:
        raise ConfigError(f"model.path: {err}") from None


def _load_gguf_model(path: str | Path, gguf_file: Path, task: str) -> nn.Module:
    if task != "causal-lm":
        raise ConfigError(f"model.path '{path}' is a GGUF causal LM; model.task must be causal-lm")
    try:
        model, _ = load_gguf(gguf_file, tokenizer=False)
    except (FormatError, FileNotFoundError) as err:
        raise ConfigError(f"model.path '{path}': {err}") from None
    return model


def _head_name(model: nn.Module) -> str | None:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def lora_settings(cfg: TrainConfig, model: nn.Module, new_modules: list[str]) -> LoraConfig:
    """The ``lora`` section completed for this model: newly initialised modules (a seq-cls
    head) are added to ``modules_to_save`` so they train in full and are saved with the adapter.
    """
    saved = list(cfg.lora.modules_to_save or [])
    wanted = list(new_modules)
    head = _head_name(model) if cfg.model.task == "seq-cls" else None
    if head is not None:
        wanted.append(head)
    for name in wanted:
        covered = any(name == s or name.endswith("." + s) or s.startswith(name) for s in saved)
        if not covered:
            saved.append(name)
    return cfg.lora.replace(modules_to_save=saved) if saved else cfg.lora


def prepare_model(model: nn.Module, cfg: TrainConfig, new_modules: list[str]) -> nn.Module:
    """Make ``model`` trainable per ``cfg``: LoRA/QLoRA via :func:`loraq.apply`, or all weights.

    Updates ``cfg.lora`` with the settings actually used (e.g. the seq-cls head added to
    ``modules_to_save``) so the saved config says what ran.
    """
    if cfg.training.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"training.gradient_checkpointing: {type(model).__name__} does not support it"
            )
        kwargs = {"use_reentrant": False}  # works with a frozen base and no input grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if cfg.training.method == "full":
        use_fast_dropout(model)  # as loraq.apply does: the same masks, drawn faster
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    try:
        cfg.lora = lora_settings(cfg, model, new_modules)
        model = apply(model, cfg.lora)
    except ValueError as err:
        raise ConfigError(f"lora: {err}") from None
    return model


def count_params(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters, weight bytes (quantized weights at their real size) and,
    for adapted models, bytes per part (adapters, modules_to_save, base_dense, base_quantized)."""
    if hasattr(model, "loraq_configs"):
        s = summary(model)
        return {
            "trainable": s.trainable_params,
            "total": s.total_params,
            "bytes": s.total_bytes,
            "parts": dict(s.bytes),
        }
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "parts": {},
    }


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; other names are passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but CUDA is not available")
    return device
