"""4-/8-bit base checkpoints in the transformers + bitsandbytes layout, written and read as bytes.

``save_quantized`` writes ``config.json`` (the model's config plus ``quantization_config``) and
``model.safetensors``. A 4-bit (NF4/FP4) Linear base uses exactly the keys and bytes that
``bnb.nn.Linear4bit`` / transformers save (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``)
and ``quantization_config`` is the one transformers writes for ``load_in_4bit=True``, so
``AutoModelForCausalLM.from_pretrained(path)`` with bitsandbytes installed loads it. loraq's
8-bit blockwise layers and 4-bit embeddings have no bitsandbytes/transformers equivalent; such a
checkpoint records ``"quant_method": "loraq"``, which transformers refuses instead of misreading.
GGUF-block layers (``LoraConfig(quant="q4_0")``, :func:`loraq.load_gguf` bases) keep their
blocks under ``weight`` with a ``weight.quant_state.loraq__gguf`` JSON key.

``load_quantized`` rebuilds the model from ``config.json`` and puts each stored record into the
layer that holds its record class (:mod:`loraq.layers.bases`: ``Linear4bit``, ``Linear8bit``,
``LinearGGUF``, ``Embedding4bit``, ``EmbeddingGGUF``) without re-quantizing: the codes and scales
keep their exact bytes. Which record a ``weight.quant_state.<kind>`` key holds is the record's
own ``STATE_KINDS``, over the records of :mod:`loraq.quant.formats`' table.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.dtypes import dtype_name, float_dtype
from ..core.naming import ADAPTER_PARTS, WRAPPER_SEGMENTS, unwrapped_name
from ..layers.bases import EMBEDDING_LAYERS, LINEAR_LAYERS
from ..layers.kinds import is_gpt2_conv1d
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.protocol import LAYOUT_CONV1D, LAYOUT_LINEAR
from ..layers.quantized import Embedding4bit, Linear4bit, Linear8bit
from ..model.targeting import output_embedding_names, set_submodule
from ..quant.formats import FORMATS
from .adapter_check import check_finite
from .model_folder import copy_tokenizer_files, source_folder
from .safe import (
    FormatError,
    atomic_save_safetensors,
    atomic_write_json,
    model_weight_files,
    read_json,
    read_safetensors,
    staged_folder,
)

_STATE_SUFFIX = ".weight.quant_state."
# ``<kind>`` of a ``weight.quant_state.<kind>`` key -> the record class that reads it.
_RECORD_OF_STATE: dict[str, type] = {
    kind: fmt.record for fmt in FORMATS.values() for kind in fmt.record.STATE_KINDS
}
_QUANTIZED_LAYERS = (*LINEAR_LAYERS.values(), *EMBEDDING_LAYERS.values())


# ---------------------------------------------------------------------------------- saving
def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's tensors under the plain model's names: LoRA tensors and trained copies
    of ``modules_to_save`` are left out, wrapper segments (``base_layer``, ``original_module``)
    removed. Quantized layers contribute bitsandbytes' keys."""
    wrappers = {n for n, m in model.named_modules() if isinstance(m, (LoRALayer, ModulesToSave))}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        kept: list[str] = []
        skip = False
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if owner in wrappers and (part in ADAPTER_PARTS):
                skip = True
                break
            if owner in wrappers and part in WRAPPER_SEGMENTS:
                continue
            kept.append(part)
        if not skip:
            out[".".join(kept)] = tensor
    return out


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{plain name: quantized layer}`` with LoRA wrapper segments removed."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _QUANTIZED_LAYERS):
            found[unwrapped_name(name)] = module
    return found


def _dense_linear_names(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
            parts = name.split(".")
            if any(p in ADAPTER_PARTS for p in parts):
                continue  # LoRA matrices and trained copies are not part of the base
            names.add(unwrapped_name(name))
    return names


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` for ``config.json``: transformers' bitsandbytes 4-bit form when
    every quantized layer is a 4-bit Linear, loraq's own form otherwise."""
    layers = _quantized_modules(model)
    if not layers:
        raise ValueError(
            "save_quantized: the model has no quantized layers; use LoraConfig(quant='nf4') or "
            "export_merged / save_pretrained for a dense model"
        )
    records = [m.qweight for m in layers.values()]
    quant_types = sorted({r.quant_type for r in records})
    compute = sorted({dtype_name(m.compute_dtype) for m in layers.values()})
    double = any(getattr(r, "double_quant", False) for r in records)
    if all(isinstance(m, Linear4bit) for m in layers.values()) and len(quant_types) == 1:
        dense = _dense_linear_names(model)
        heads = {unwrapped_name(n) for n in output_embedding_names(model)}
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": compute[0] if len(compute) == 1 else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": quant_types[0],
            "bnb_4bit_use_double_quant": double,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            # null = transformers' default (keep the output embeddings dense, not a classifier
            # head); otherwise the exact set.
            "llm_int8_skip_modules": None if dense == heads else sorted(dense),
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }
    return {
        "quant_method": "loraq",
        "quant_types": quant_types,
        "double_quant": double,
        "compute_dtype": compute[0] if len(compute) == 1 else "float32",
        "quantized_embeddings": any(isinstance(m, Embedding4bit) for m in layers.values()),
        "linear8bit": any(isinstance(m, Linear8bit) for m in layers.values()),
    }


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the quantized base of ``model`` (adapters excluded) in transformers' layout.

    The folder gets ``model.safetensors`` (bitsandbytes keys for 4-bit layers, metadata
    ``{"format": "pt"}``), ``config.json`` with ``quantization_config`` (for a transformers model;
    a plain module gets a ``config.json`` holding only that), ``generation_config.json`` when the
    model has one, and the tokenizer files of the base's folder. Save adapters separately with
    :func:`loraq.save_adapter`; note that a PiSSA-initialised base is the residual weight.
    """
    with staged_folder(path) as staging:
        write_quantized_files(model, staging)
    return Path(path)


def write_quantized_files(model: nn.Module, folder: Path) -> None:
    """The files of :func:`save_quantized`, written into an existing (staging) ``folder``."""
    qconfig = quantization_config(model)
    tensors = base_state_dict(model)
    # As transformers does, store a tied weight once (under its source's name).
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in tensors and source in tensors:
            del tensors[target]
    config = getattr(model, "config", None)
    data: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        data = config.to_dict()
        # As transformers' save_pretrained: record the class and the dense tensors' dtype.
        if not data.get("architectures") and hasattr(model, "save_pretrained"):
            data["architectures"] = [type(model).__name__]
        floats = [t.dtype for t in tensors.values() if t.is_floating_point() and t.ndim > 1]
        if floats:
            data["dtype"] = dtype_name(max(set(floats), key=floats.count))
    data["quantization_config"] = qconfig
    source = source_folder(model)
    atomic_save_safetensors(folder / "model.safetensors", tensors)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        with contextlib.suppress(Exception):  # optional extra; never fail the save for it
            generation.save_pretrained(folder)
    if source is not None:
        copy_tokenizer_files(source, folder)
    atomic_write_json(folder / "config.json", data)


# ---------------------------------------------------------------------------------- loading
def _build_model(folder: Path, data: dict[str, Any], model_class: Any) -> nn.Module:
    """The dense skeleton: a transformers class (concrete or Auto*) built from ``config.json``,
    or ``model_class()`` for a plain factory."""
    is_hf = (
        model_class is None
        or hasattr(model_class, "from_config")
        or hasattr(model_class, "_from_config")
    )
    if not is_hf:
        return model_class()
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    config_file = folder / "config.json"
    if model_class is None:
        archs = data.get("architectures") or []
        first = archs[0] if isinstance(archs, list) and archs else None
        model_class = getattr(transformers, first, None) if isinstance(first, str) else None
        if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
            raise FormatError(
                f"{config_file}: field 'architectures' ({archs!r}) names no transformers model "
                "class; pass model_class= (e.g. AutoModelForCausalLM)"
            )
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise FormatError(f"{config_file}: transformers cannot read this config: {err}") from None
    wanted = getattr(model_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise FormatError(
            f"{config_file}: field 'architectures' names {model_class.__name__}, which needs a "
            f"{wanted.__name__}, but the config is a {type(config).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}); fix 'architectures' or pass model_class="
        )
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the model is built dense, then swapped
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        no_init_weights = contextlib.nullcontext
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    kwargs = {"dtype": dtype} if isinstance(dtype, torch.dtype) else {}
    with no_init_weights():  # every weight is loaded from the file next
        if hasattr(model_class, "_from_config"):  # a concrete PreTrainedModel class
            return model_class._from_config(config, **kwargs)
        return model_class.from_config(config, **kwargs)  # an Auto* class


def _state_keys(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{module name: quant type}`` from the ``weight.quant_state.<lib>__<type>`` keys."""
    found = {}
    for key in tensors:
        if _STATE_SUFFIX in key:
            module, _, tail = key.partition(_STATE_SUFFIX)
            found[module] = tail
    return found


def _quantized_layer(
    name: str, kind: str, module: nn.Module, tensors: dict, compute_dtype: torch.dtype, source: str
) -> nn.Module:
    prefix = name + "."
    record_type = _RECORD_OF_STATE.get(kind)
    if record_type is None:
        raise FormatError(
            f"{source}: {prefix}weight.quant_state.{kind} names no format loraq reads; known: "
            f"{', '.join(sorted(_RECORD_OF_STATE))}"
        )
    layers = EMBEDDING_LAYERS if isinstance(module, nn.Embedding) else LINEAR_LAYERS
    if record_type not in layers:
        raise FormatError(
            f"{source}: {prefix}weight is a {record_type.__name__}, which no loraq layer holds "
            f"for a {type(module).__name__}"
        )
    try:
        record = record_type.from_state_dict(tensors, prefix)
    except ValueError as err:
        raise FormatError(f"{source}: {err}") from None
    if isinstance(module, nn.Embedding):
        expected = tuple(module.weight.shape)
    elif is_gpt2_conv1d(module):
        expected = tuple(module.weight.shape[::-1])  # Conv1D stores (in, out)
    elif isinstance(module, nn.Linear):
        expected = (module.out_features, module.in_features)
    else:
        raise FormatError(
            f"{source}: {prefix}weight is quantized but {name} is a {type(module).__name__}, "
            "not a Linear, Conv1D or Embedding"
        )
    if tuple(record.shape) != expected:
        raise FormatError(
            f"{source}: tensor {prefix + 'weight'!r} has shape {tuple(record.shape)} but the "
            f"model expects {expected}"
        )
    if isinstance(module, nn.Embedding):
        return layers[record_type](record, module.padding_idx, compute_dtype)
    bias = tensors.get(prefix + "bias")
    # The dense module the model class expects here, restored by dequantize_model / unload.
    layout = LAYOUT_CONV1D if is_gpt2_conv1d(module) else LAYOUT_LINEAR
    return layers[record_type](record, bias, compute_dtype, layout)


def load_quantized(
    path: str | os.PathLike[str], model_class: type | Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` or by transformers + bitsandbytes.

    The model is built from ``config.json`` (class: ``model_class`` or ``architectures[0]``;
    for a plain module pass a zero-argument factory), each quantized weight becomes a loraq
    ``Linear4bit`` / ``Linear8bit`` / ``Embedding4bit`` holding the stored bytes unchanged, and
    the dense tensors are loaded as stored. Returns the model in eval mode with every parameter
    frozen, ready for :func:`loraq.apply` or :func:`loraq.load_adapter`.

    Peak memory is about that of the dense model in its config dtype, since the skeleton is
    allocated before the quantized layers replace its Linear modules.

    Raises:
        FormatError: pickle-only folder, no ``quantization_config``, corrupt files, a record
            whose shape does not fit the model (key and both shapes), missing/unexpected keys.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files = model_weight_files(folder)
    config_file = folder / "config.json"
    data = read_json(config_file)
    qconfig = data.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") not in (
        "bitsandbytes",
        "loraq",
    ):
        raise FormatError(
            f"{config_file}: field 'quantization_config' is missing or not a bitsandbytes/loraq "
            "config; load a dense checkpoint with transformers' from_pretrained"
        )
    if qconfig.get("load_in_8bit"):
        raise FormatError(
            f"{config_file}: quantization_config has load_in_8bit (LLM.int8); loraq reads 4-bit "
            "bitsandbytes checkpoints and its own 8-bit blockwise format only"
        )
    compute_name = (
        qconfig.get("bnb_4bit_compute_dtype") or qconfig.get("compute_dtype") or "float32"
    )
    try:
        compute_dtype = float_dtype(str(compute_name), "compute dtype")
    except ValueError as err:
        raise FormatError(f"{config_file}: {err}") from None

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        part, _ = read_safetensors(file)
        tensors.update(part)
        origin.update(dict.fromkeys(part, file))
    states = _state_keys(tensors)
    for name in states:  # codes are integers; scales and code tables must be finite
        state = {k: t for k, t in tensors.items() if k.startswith(name + ".weight")}
        check_finite(state, str(origin[next(iter(state))]))
    model = _build_model(folder, data, model_class)
    for name, kind in states.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(
                f"{origin[name + _STATE_SUFFIX + kind]}: quantized weight {name}.weight has no "
                "module of that name in the model"
            ) from None
        source = str(origin[name + _STATE_SUFFIX + kind])
        set_submodule(
            model, name, _quantized_layer(name, kind, module, tensors, compute_dtype, source)
        )
    _load_dense(model, tensors, files)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_dense(model: nn.Module, tensors: dict[str, torch.Tensor], files: list[Path]) -> None:
    # Quantized layers were built from their keys already; load_state_dict re-reads them as the
    # same bytes (and checks them), then everything else is assigned as stored.
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = set(result.missing_keys)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        # assign=True replaced tied parameters one by one; re-tie them (and fill the keys
        # transformers leaves out for tied weights, e.g. lm_head.weight).
        try:
            tie(missing_keys=missing)
        except TypeError:
            tie()
    if result.unexpected_keys or missing:
        parts = []
        if missing:
            parts.append(f"missing keys {sorted(missing)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {sorted(result.unexpected_keys)}")
        raise FormatError(
            f"{', '.join(map(str, files))} does not fit the model: " + "; ".join(parts)
        )
