"""Model-level operations: pick target modules, wrap them, freeze the rest, switch/merge/unload."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoraConfig
from .layers.lora import (
    ADAPTER_STORES,
    SUPPORTED_TYPES,
    LoRALayer,
    ModulesToSave,
    is_gpt2_conv1d,
    is_quantized_linear,
    layer_kind,
)
from .transaction import model_transaction

#: Attribute on the model holding ``{adapter_name: LoraConfig}``.
CONFIGS_ATTR = "loraq_configs"
#: Attribute on the model holding ``{adapter_name: [full names of adapted modules]}``.
TARGETS_ATTR = "loraq_targets"
_HEAD_NAMES = ("lm_head", "classifier", "score")


# ---------------------------------------------------------------------------------- matching
def name_matches(name: str, patterns: str | list[str]) -> bool:
    """PEFT's rule: a regex string must fullmatch ``name``; a list entry must equal ``name`` or be
    a dotted suffix of it (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module) or is_quantized_linear(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output heads that ``"all-linear"`` leaves alone (as PEFT does)."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        with contextlib.suppress(Exception):
            head = get_out()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is head or (
            head is not None and isinstance(module, LoRALayer) and module.base_layer is head
        ):
            names.add(name)
        elif leaf in _HEAD_NAMES and "." not in name:
            names.add(name)
    return names


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` pairs that may receive adapters; the insides of wrappers are skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoRALayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` targets; raises if none match or a match is unsupported."""
    heads = output_head_names(model) if config.targets == "all-linear" else set()
    saved = config.modules_to_save or []
    chosen: list[str] = []
    for name, module in _candidate_modules(model):
        if not name or isinstance(module, ModulesToSave) or name_matches(name, saved):
            continue
        inner = module.base_layer if isinstance(module, LoRALayer) else module
        if config.targets == "all-linear":
            hit = _is_linear_like(inner) and name not in heads
        else:
            hit = name_matches(name, config.targets)
        if not hit or (config.exclude is not None and name_matches(name, config.exclude)):
            continue
        if layer_kind(inner) is None:
            raise ValueError(
                f"LoraConfig.targets matched module {name!r} of type {type(inner).__name__}, "
                f"which cannot get an adapter; supported: {SUPPORTED_TYPES}"
            )
        chosen.append(name)
    if not chosen:
        examples = [n for n, m in _candidate_modules(model) if n and layer_kind(m) is not None][:12]
        raise ValueError(
            f"LoraConfig.targets={config.targets!r} matched no module. "
            f"Some adaptable modules in this model: {examples}"
        )
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


# ---------------------------------------------------------------------------------- iteration
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Every ``LoRALayer`` in ``model`` with its name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were added."""
    return list(getattr(model, CONFIGS_ATTR, {}))


def _require_adapter(model: nn.Module, name: str) -> None:
    if name not in getattr(model, CONFIGS_ATTR, {}):
        raise ValueError(f"model has no adapter {name!r}; adapters: {adapter_names(model)}")


# ---------------------------------------------------------------------------------- apply
def apply(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    allow_large_rank: bool = False,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and return it.

    Each targeted module is wrapped in a :class:`LoRALayer` (the original stays inside, frozen);
    every other parameter is frozen except ``modules_to_save`` and the biases ``config.bias``
    names. When ``config.quant`` is set, the frozen base's Linear layers are quantized first.
    The new adapter becomes the active one (see :func:`set_adapter` to switch).

    ``config.r`` may not exceed ``min(in, out)`` of a targeted layer (a larger rank adds
    parameters, not expressiveness) unless ``allow_large_rank=True``. Everything is checked
    before the model changes, and a call that raises leaves the model exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply() needs a loraq.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name must be a non-empty string without dots, got {adapter_name!r}"
        )
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR, {})
    if adapter_name in configs:
        raise ValueError(
            f"model already has an adapter named {adapter_name!r}; pick another adapter_name"
        )
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError(
            "cannot add an adapter while adapters are merged; call loraq.unmerge(model) first"
        )

    targets = find_targets(model, config)
    saved = {name: _saved_module_matches(model, name) for name in config.modules_to_save or []}
    _check_targets(model, config, targets, allow_large_rank)
    protect = []
    if config.init == "pissa":  # PiSSA rewrites the base weight in place
        protect = [
            t for n in targets for t in model.get_submodule(n).state_dict(keep_vars=True).values()
        ]
    with model_transaction(model, protect):
        _apply_checked(model, config, adapter_name, targets, saved)
    return model


def _apply_checked(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    targets: list[str],
    saved: dict[str, list[str]],
) -> None:
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR, {})
    if config.quant is not None:
        from .quantize_model import quantize_model

        quantize_model(model, config, adapted=targets)

    unique = dict.fromkeys(full for matches in saved.values() for full in matches)
    _add_saved_module(model, list(unique), adapter_name)

    options = {"init": config.init, "use_rslora": config.use_rslora, "use_dora": config.use_dora}
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALayer):
            module = LoRALayer(module)
            _set_submodule(model, name, module)
        module.add_adapter(adapter_name, config.r, config.alpha, config.dropout, **options)
        if config.adapter_bits is not None:
            from .layers.adapter_quant import enable_adapter_quant

            enable_adapter_quant(module, adapter_name, config.adapter_bits)

    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    targets_by_adapter = getattr(model, TARGETS_ATTR, {})
    targets_by_adapter[adapter_name] = targets
    setattr(model, TARGETS_ATTR, targets_by_adapter)
    set_adapter(model, adapter_name)


def _saved_module_matches(model: nn.Module, name: str) -> list[str]:
    matches = [n for n, m in _candidate_modules(model) if n and name_matches(n, [name])]
    if not matches:
        raise ValueError(
            f"LoraConfig.modules_to_save entry {name!r} matches no module in the model"
        )
    return matches


def _rank_limit(module: nn.Module) -> int:
    """``min`` of the adapter matrix shape for ``module`` (rows of B, columns of A)."""
    if isinstance(module, LoRALayer):
        module = module.base_layer
    if is_quantized_linear(module):
        return min(module.in_features, module.out_features)
    weight = module.weight
    if isinstance(module, nn.Embedding):
        return min(weight.shape)
    return min(weight.shape[0], weight[0].numel()) if weight.dim() > 2 else min(weight.shape)


def _check_targets(
    model: nn.Module, config: LoraConfig, targets: list[str], allow_large_rank: bool
) -> None:
    """What adding the adapter would reject half-way, checked before the model changes."""
    for name in targets:
        module = model.get_submodule(name)
        inner = module.base_layer if isinstance(module, LoRALayer) else module
        limit = _rank_limit(inner)
        if config.r > limit and (not allow_large_rank or config.init == "pissa"):
            raise ValueError(
                f"LoraConfig.r={config.r} is invalid for module {name!r}: expected at most "
                f"min(in, out) = {limit} (a larger rank adds parameters but no expressiveness; "
                "pass allow_large_rank=True to loraq.apply to allow it)"
            )
        if config.use_dora and layer_kind(inner) == "embedding":
            raise ValueError(
                f"LoraConfig.use_dora=True is invalid for module {name!r}: DoRA is not "
                "supported for nn.Embedding layers; exclude it or target Linear/Conv layers"
            )
        if config.init == "pissa" and layer_kind(inner) == "conv":
            if any(k != 1 for k in inner.kernel_size):
                raise ValueError(
                    f"LoraConfig.init='pissa' is invalid for module {name!r}: PiSSA on a "
                    "convolution needs a 1x1 kernel"
                )


def _add_saved_module(model: nn.Module, matches: list[str], adapter_name: str) -> None:
    for full in matches:
        module = model.get_submodule(full)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_submodule(model, full, module)
        module.add_adapter(adapter_name)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active (and the only trainable) adapter."""
    _require_adapter(model, name)
    config: LoraConfig = getattr(model, CONFIGS_ATTR)[name]
    merged = sorted({a for _, layer in lora_layers(model) for a in layer.merged_adapters})
    if merged and merged != [name]:
        # A merged adapter stays in the base weights whatever is active; switching without
        # unmerging would compute base + old + new. PEFT unmerges here too.
        warnings.warn(
            f"set_adapter({name!r}): unmerging adapter(s) {merged} first", UserWarning, stacklevel=2
        )
        unmerge(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active_adapters = [name] if name in layer.r else []
        for param in layer.adapter_parameters(name):
            param.requires_grad_(True)
        if config.bias == "lora_only" and name in layer.r and layer.bias is not None:
            layer.bias.requires_grad_(True)
    for _, saved in _saved_modules(model):
        saved.active_adapter = name
        if name in saved.modules_to_save:
            for param in saved.modules_to_save[name].parameters():
                param.requires_grad_(True)
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and param.is_floating_point():
                param.requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None."""
    for _, layer in lora_layers(model):
        if layer.active_adapters:
            return layer.active_adapters[0]
    return None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes exactly as the base model."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in _saved_modules(model)]
    previous = [m.adapters_disabled for m in layers]
    for m in layers:
        m.adapters_disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.adapters_disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; another adapter becomes active if it was."""
    _require_adapter(model, name)
    was_active = active_adapter(model) == name
    for _, layer in lora_layers(model):
        if name in layer.r:
            layer.delete_adapter(name)
    for _, saved in _saved_modules(model):
        if name in saved.modules_to_save:
            del saved.modules_to_save[name]
    del getattr(model, CONFIGS_ATTR)[name]
    getattr(model, TARGETS_ATTR, {}).pop(name, None)
    remaining = adapter_names(model)
    if was_active and remaining:
        set_adapter(model, remaining[0])


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (outputs unchanged up to rounding).

    On a quantized base the merged weight is re-quantized, which is lossy: the largest absolute
    weight change this caused is stored in ``model.loraq_merge_error`` and reported in a warning.
    """
    worst = 0.0
    quantized = False
    for _, layer in lora_layers(model):
        worst = max(worst, layer.merge())
        quantized = quantized or is_quantized_linear(layer.base_layer)
    if quantized:
        model.loraq_merge_error = worst
        warnings.warn(
            f"merged adapters into a quantized base: re-quantization changed weights by up to {worst:.3g} "
            "(use loraq.unload(model, dense=True) for an exact dense merge)",
            UserWarning,
            stacklevel=2,
        )
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights up to float rounding."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapters: bool = True, dense: bool = False) -> nn.Module:
    """Remove all wrappers, returning the plain model (with the active adapter merged by default).

    ``modules_to_save`` are replaced by the active adapter's trained copy. A quantized base stays
    quantized (merging re-quantizes) unless ``dense=True``: then every quantized layer is
    dequantized first and the adapters merge exactly into dense weights.
    """
    if dense:
        from .quantize_model import dequantize_model

        for _, layer in lora_layers(model):
            if is_quantized_linear(layer.base_layer):
                layer.unmerge()
        dequantize_model(model)
    for name, layer in list(lora_layers(model)):
        if merge_adapters:
            layer.merge()
        _set_submodule(model, name, layer.base_layer)
    for name, saved in list(_saved_modules(model)):
        active = saved.active_adapter
        keep = (
            saved.modules_to_save[active]
            if active in saved.modules_to_save
            else saved.original_module
        )
        _set_submodule(model, name, keep)
    for attr in (CONFIGS_ATTR, TARGETS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors belonging to adapter ``name`` (default: active), keyed by their model names."""
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("model has no adapters")
    _require_adapter(model, name)
    out: dict[str, torch.Tensor] = {}
    token = f".{name}"
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        for i, part in enumerate(parts[:-1] if not key.endswith(token) else parts):
            if part == name and i > 0 and parts[i - 1] in (*ADAPTER_STORES, "modules_to_save"):
                out[key] = tensor
                break
    return out


def config_of(model: nn.Module, name: str | None = None) -> LoraConfig:
    """The ``LoraConfig`` adapter ``name`` (default: active) was created with."""
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("model has no adapters")
    _require_adapter(model, name)
    return getattr(model, CONFIGS_ATTR)[name]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what an optimizer should get)."""
    return [p for p in model.parameters() if p.requires_grad]
