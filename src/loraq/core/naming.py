"""How adapter tensors are named, in memory and on disk: the one place that knows the rules.

In memory a wrapped module ``<m>`` holds its adapter ``<a>`` under PEFT's attribute names; on
disk (PEFT's files) the adapter name is dropped and ``base_model.model.`` goes in front:

======================================  ======================================  ===============
in memory                               on disk (after the prefix)              store kind
======================================  ======================================  ===============
``<m>.lora_A.<a>.weight``               ``<m>.lora_A.weight``                   module factor
``<m>.lora_B.<a>.weight``               ``<m>.lora_B.weight``                   module factor
``<m>.lora_embedding_A.<a>``            ``<m>.lora_embedding_A``                parameter
``<m>.lora_embedding_B.<a>``            ``<m>.lora_embedding_B``                parameter
``<m>.lora_magnitude_vector.<a>``       ``<m>.lora_magnitude_vector``           parameter
``<m>.modules_to_save.<a>.<p>``         ``<m>.<p>``                             saved module
======================================  ======================================  ===============

The wrapped module itself sits under ``<m>.base_layer`` (adapters) or ``<m>.original_module``
(saved modules). A leaf module: it imports nothing from loraq.
"""

from __future__ import annotations

import re

#: Stores of the low-rank factors, which ``adapter_bits`` keeps on a k-bit grid.
FACTOR_STORES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
#: On-disk key suffixes (after the module's name) of A and B: factors held as modules
#: (linear, conv) and as plain parameters (embeddings).
MODULE_FACTOR_SUFFIXES = ("lora_A.weight", "lora_B.weight")
PARAMETER_FACTOR_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")
#: Attribute names under which ``LoRALayer`` keeps per-adapter tensors (PEFT's names).
ADAPTER_STORES = (*FACTOR_STORES, "lora_magnitude_vector")
#: Attribute under which ``ModulesToSave`` keeps each adapter's trained copy.
SAVED_STORE = "modules_to_save"
#: Attributes of a wrapper that belong to adapters, not to the frozen base.
ADAPTER_PARTS = (*ADAPTER_STORES, "lora_dropout", SAVED_STORE)
#: Path segments a wrapper inserts between a module's name and the module it wraps.
WRAPPER_SEGMENTS = ("base_layer", "original_module")

_FACTOR_KEY = re.compile(r".*\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
_MODULE_FACTOR = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")
# Older PEFT wrote the DoRA magnitude with a ".weight" suffix.
_PARAMETER_STORE = re.compile(
    r"(.+)\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight)?"
)


def is_factor_key(key: str) -> bool:
    """True for the on-disk key of a low-rank factor (what ``adapter_bits`` stores as codes)."""
    return _FACTOR_KEY.fullmatch(key) is not None


def adapted_module_of(key: str) -> str | None:
    """The module an on-disk adapter key belongs to (``"m.lora_A.weight.codes"`` -> ``"m"``), or
    None for a key that is not in an adapter store."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i and part in ADAPTER_STORES:
            return ".".join(parts[:i])
    return None


def memory_key(disk_key: str, adapter: str) -> str | None:
    """The in-memory name of a LoRA tensor's on-disk key (no prefix), or None if it is not one."""
    match = _MODULE_FACTOR.fullmatch(disk_key)
    if match:
        return f"{match[1]}.{match[2]}.{adapter}.weight"
    match = _PARAMETER_STORE.fullmatch(disk_key)
    if match:
        return f"{match[1]}.{match[2]}.{adapter}"
    return None


def split_disk_key(disk_key: str) -> tuple[str, str] | None:
    """``(module, store)`` of a LoRA tensor's on-disk key (no prefix), ``store`` one of
    :data:`ADAPTER_STORES` (``"m.lora_A.weight"`` -> ``("m", "lora_A")``); None otherwise."""
    match = _MODULE_FACTOR.fullmatch(disk_key) or _PARAMETER_STORE.fullmatch(disk_key)
    return None if match is None else (match[1], match[2])


def disk_key(name: str, adapter: str) -> str:
    """The on-disk key (no prefix) of the in-memory name of adapter ``adapter``'s tensor."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == adapter and parts[i - 1] in (*ADAPTER_STORES, SAVED_STORE):
            kept = parts[: i - 1] if parts[i - 1] == SAVED_STORE else parts[:i]
            return ".".join(kept + parts[i + 1 :])
    return name


def unwrapped_name(name: str) -> str:
    """``name`` with the wrapper segments removed, whole segments only:
    ``"encoder.layer.0.base_layer"`` -> ``"encoder.layer.0"``, while ``"encoder.base_layers.0"``
    stays as it is."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
