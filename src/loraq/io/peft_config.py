"""``adapter_config.json`` as PEFT 0.22 writes it, to and from :class:`loraq.LoraConfig`.

PEFT's LoRA config has 41 fields (listed in :data:`PEFT_LORA_DEFAULTS`). loraq maps thirteen of them
to its own settings, treats a few as information only, and accepts the rest only at their
default value: a non-default value means a feature loraq does not implement (per-layer ranks,
layer selection, ...), and silently ignoring it would load a different model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..layers.lora import LoRALayer, is_gpt2_conv1d
from ..model.config import LoraConfig
from ..model.surgery import TARGETS_ATTR
from ..quant.formats import FORMATS
from .safe import FormatError

#: The PEFT release whose file layout loraq writes (recorded as ``peft_version``).
PEFT_FORMAT_VERSION = "0.22.0"
#: The file of an adapter folder that holds this config.
CONFIG_NAME = "adapter_config.json"
#: Extra config field loraq adds for adapters saved as k-bit integer codes.
ADAPTER_BITS_FIELD = "loraq_adapter_bits"

#: Every field of PEFT 0.22.0's ``LoraConfig.to_dict()`` with its default value.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "astra_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

#: Fields that describe the file, not the math; any value is accepted and kept in ``extra``.
INFO_FIELDS = (
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "peft_version",
    "revision",
    "task_type",
)
#: Fields loraq decides itself: the Conv1D orientation is detected from the module type, and
#: these two only matter together with features that must stay at their defaults.
DERIVED_FIELDS = ("fan_in_fan_out", "megatron_core", "qalora_group_size")
#: Fields loraq translates into ``LoraConfig`` settings.
MAPPED_FIELDS = (
    "bias",
    "exclude_modules",
    "init_lora_weights",
    "loftq_config",
    "lora_alpha",
    "lora_dropout",
    "modules_to_save",
    "peft_type",
    "r",
    "target_modules",
    "target_parameters",
    "use_dora",
    "use_rslora",
)
#: Everything else: features loraq does not implement, accepted only when off / empty.
UNSUPPORTED_FIELDS = tuple(
    k for k in PEFT_LORA_DEFAULTS if k not in INFO_FIELDS + DERIVED_FIELDS + MAPPED_FIELDS
)

#: loraq init -> PEFT ``init_lora_weights``. A LoftQ adapter is written as PEFT's own LoftQ
#: recipe saves one: ``init_lora_weights: true`` (the base is stored already quantized, so
#: nothing must run again on load) with ``loftq_config`` kept, which marks it as LoftQ.
_INIT_TO_PEFT: dict[str, bool | str] = {
    "kaiming": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "loftq": True,
}
_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


# ---------------------------------------------------------------------------------- writing
def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name (None if unknown)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and name.endswith(
        ("ForConditionalGeneration", "ForSeq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    is_transformers = type(model).__module__.startswith("transformers.")
    if is_transformers and name.endswith("Model") and hasattr(model, "get_input_embeddings"):
        return "FEATURE_EXTRACTION"
    return None


def base_model_name(model: nn.Module) -> str | None:
    """Where the base model came from (``config._name_or_path``), or None if built in code."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


def _targets_conv1d(model: nn.Module, adapter: str) -> bool:
    return any(
        isinstance(m, LoRALayer) and adapter in m.r and is_gpt2_conv1d(m.base_layer)
        for m in model.modules()
    )


def peft_config_dict(model: nn.Module, adapter: str, config: LoraConfig) -> dict[str, Any]:
    """The full ``adapter_config.json`` object PEFT 0.22 would write for this adapter."""
    targets: str | list[str]
    if config.targets == "all-linear":
        # PEFT expands "all-linear" to the full module paths before saving; so do we.
        targets = sorted(getattr(model, TARGETS_ATTR, {}).get(adapter, []))
    else:
        targets = config.targets
    task_type = config.extra.get("task_type", infer_task_type(model))
    out = dict(PEFT_LORA_DEFAULTS)
    out.update(
        {
            "base_model_name_or_path": config.extra.get(
                "base_model_name_or_path", base_model_name(model)
            ),
            "bias": config.bias,
            "exclude_modules": config.exclude,
            "fan_in_fan_out": _targets_conv1d(model, adapter),
            "inference_mode": True,
            "init_lora_weights": _INIT_TO_PEFT[config.init],
            "loftq_config": _loftq_config(config),
            "lora_alpha": _plain_number(config.alpha),
            "lora_dropout": float(config.dropout),
            "modules_to_save": config.modules_to_save,
            "r": config.r,
            "revision": config.extra.get("revision"),
            "target_modules": targets,
            "target_parameters": config.target_parameters,
            "task_type": task_type,
            "use_dora": config.use_dora,
            "use_rslora": config.use_rslora,
        }
    )
    if task_type is None:
        # PEFT's base PeftModel records the model class so AutoPeftModel can rebuild it.
        out["auto_mapping"] = {
            "base_model_class": type(model).__name__,
            "parent_library": type(model).__module__,
        }
    return out


def _loftq_config(config: LoraConfig) -> dict[str, int]:
    if config.init != "loftq":
        return {}
    # PEFT's loftq_bits is the code width of the base format.
    if config.quant is not None:
        bits = FORMATS[config.quant].code_bits
    else:
        bits = config.extra.get("loftq_bits", 4)
    return {"loftq_bits": bits, "loftq_iter": config.loftq_iters}


def _plain_number(value: float) -> int | float:
    # PEFT stores lora_alpha as the user typed it; keep integers integral in the JSON.
    return int(value) if float(value).is_integer() else float(value)


# ---------------------------------------------------------------------------------- reading
def _field_error(source: str, name: str, problem: str) -> FormatError:
    return FormatError(f"{source}: field {name!r} {problem}")


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == []


def _check_type(source: str, data: Mapping[str, Any], name: str, kinds: tuple, what: str) -> Any:
    value = data[name]
    bad_bool = isinstance(value, bool) and bool not in kinds
    if bad_bool or not isinstance(value, kinds):
        raise _field_error(source, name, f"must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _names(source: str, data: Mapping[str, Any], name: str) -> str | list[str] | None:
    value = data[name]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _field_error(
        source, name, f"must be a list of module names, a regex string or null, got {value!r}"
    )


def _checked_envelope(source: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over PEFT's defaults, once its field names, ``peft_type`` and the PEFT features
    loraq cannot honour have been checked."""
    known = set(PEFT_LORA_DEFAULTS) | {ADAPTER_BITS_FIELD}
    # A later PEFT writes every field of its own, new features' at their defaults: a field
    # loraq does not know is read only when it is off (null, false, empty), as it then is.
    unknown = sorted(k for k in set(data) - known if not _is_off(data[k]))
    if unknown:
        raise FormatError(
            f"{source}: unknown field(s) {unknown}; loraq reads the fields of PEFT "
            f"{PEFT_FORMAT_VERSION}'s LoraConfig, and unknown ones only when null, false or "
            "empty (remove them if they are at their defaults)"
        )
    data = {k: v for k, v in data.items() if k in known}
    if "peft_type" not in data:
        raise _field_error(source, "peft_type", "is missing; expected 'LORA'")
    full = {**PEFT_LORA_DEFAULTS, **data}
    if full["peft_type"] != "LORA":
        raise _field_error(
            source,
            "peft_type",
            f"is {full['peft_type']!r}; loraq reads LoRA adapters only (peft_type 'LORA')",
        )
    for name in UNSUPPORTED_FIELDS:
        if not _is_off(full[name]) and full[name] != PEFT_LORA_DEFAULTS[name]:
            raise _field_error(
                source,
                name,
                f"is {full[name]!r}; loraq does not support this PEFT feature "
                f"(only the default {PEFT_LORA_DEFAULTS[name]!r} can be loaded)",
            )
    return full


def lora_config_from_peft(
    data: Mapping[str, Any], source: str = CONFIG_NAME
) -> tuple[LoraConfig, int | None]:
    """Translate a PEFT LoRA config into ``(LoraConfig, adapter_bits of the stored codes)``.

    Raises :class:`FormatError` naming the field for unknown fields, wrong types, a non-LoRA
    ``peft_type`` and PEFT features loraq cannot honour. Missing fields take PEFT's defaults.
    """
    full = _checked_envelope(source, data)

    r = _check_type(source, full, "r", (int,), "a positive integer")
    alpha = _check_type(source, full, "lora_alpha", (int, float), "a number")
    dropout = _check_type(source, full, "lora_dropout", (int, float), "a number")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
        _check_type(source, full, name, (bool,), "true or false")
    bias = _check_type(source, full, "bias", (str,), "a string")
    targets = _names(source, full, "target_modules")
    target_parameters = _parameter_names(source, full["target_parameters"])
    if target_parameters and not targets:
        targets = []  # parameters only (PEFT adapts no module then)
    elif targets is None or targets == []:
        raise _field_error(
            source,
            "target_modules",
            "is empty; loraq needs the module names (PEFT's per-architecture defaults are not "
            "built in)",
        )
    exclude = _names(source, full, "exclude_modules") or None
    saved = full["modules_to_save"]
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(v, str) for v in saved)
    ):
        raise _field_error(source, "modules_to_save", f"must be a list of names, got {saved!r}")
    init = _init_from_peft(source, full["init_lora_weights"])
    loftq_iters, loftq_bits = _loftq_from_peft(source, full["loftq_config"], init)
    if loftq_iters is not None:
        init = "loftq"
    for name in ("task_type", "base_model_name_or_path", "revision", "peft_version"):
        if full[name] is not None and not isinstance(full[name], str):
            raise _field_error(source, name, f"must be a string or null, got {full[name]!r}")
    bits = full.get(ADAPTER_BITS_FIELD)
    if bits is not None:
        bits = _check_type(source, full, ADAPTER_BITS_FIELD, (int,), "an integer in 2..8")

    extra = {k: full[k] for k in ("task_type", "base_model_name_or_path", "revision")}
    if loftq_bits is not None:
        extra["loftq_bits"] = loftq_bits
    try:
        config = LoraConfig(
            r=r,
            alpha=alpha,
            dropout=float(dropout),
            targets=targets,
            exclude=exclude,
            bias=bias,
            modules_to_save=list(saved) if saved else None,
            init=init,
            loftq_iters=loftq_iters or 1,
            use_rslora=full["use_rslora"],
            use_dora=full["use_dora"],
            adapter_bits=bits,
            target_parameters=target_parameters,
            extra=extra,
        )
    except ValueError as err:
        # LoraConfig names its own field; say which PEFT field it came from.
        raise FormatError(f"{source}: {_peft_names(str(err))}") from None
    if not math.isfinite(config.alpha):
        raise _field_error(source, "lora_alpha", f"must be finite, got {alpha!r}")
    return config, bits


_LORAQ_TO_PEFT_NAME = {
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "exclude": "exclude_modules",
    "adapter_bits": ADAPTER_BITS_FIELD,
}


def _peft_names(message: str) -> str:
    # "LoraConfig.alpha=-1 is invalid: ..." -> "field 'lora_alpha': lora_alpha=-1 is invalid: ..."
    match = re.match(r"LoraConfig\.(\w+)=(.*)", message, re.S)
    if not match:
        return message
    name = _LORAQ_TO_PEFT_NAME.get(match[1], match[1])
    return f"field {name!r}: {name}={match[2]}"


def _parameter_names(source: str, value: Any) -> list[str] | None:
    if value is None or value == []:
        return None
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _field_error(
        source, "target_parameters", f"must be a list of parameter names or null, got {value!r}"
    )


def _loftq_from_peft(source: str, value: Any, init: str) -> tuple[int | None, int | None]:
    """``(loftq_iters, loftq_bits)`` from ``loftq_config``, or ``(None, None)`` if not LoftQ."""
    if init == "loftq" and _is_off(value):
        raise _field_error(source, "loftq_config", "is empty; init_lora_weights 'loftq' needs it")
    if _is_off(value):
        return None, None
    if not isinstance(value, dict) or set(value) - {"loftq_bits", "loftq_iter"}:
        raise _field_error(
            source, "loftq_config", f"must be {{loftq_bits: 4 or 8, loftq_iter: N}}, got {value!r}"
        )
    bits, iters = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
    if bits not in (4, 8) or isinstance(bits, bool):
        raise _field_error(source, "loftq_config", f"loftq_bits must be 4 or 8, got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise _field_error(
            source, "loftq_config", f"loftq_iter must be a positive integer, got {iters!r}"
        )
    return iters, bits


def _init_from_peft(source: str, value: Any) -> str:
    # Inits that only set A and B are irrelevant when the weights are loaded next; inits that
    # rewrite the base weight (PiSSA) must be replayed exactly, so only the full-SVD form is OK.
    if value is True or value is False:
        return "kaiming"
    if value == "gaussian":
        return "gaussian"
    if value == "pissa":
        return "pissa"
    if value == "loftq":
        return "loftq"
    raise _field_error(
        source,
        "init_lora_weights",
        f"is {value!r}; loraq can load adapters initialised with true, false, 'gaussian', "
        "'pissa' or 'loftq' (other methods rewrite the base weights in ways loraq does not replay)",
    )
