"""Model-level operations: pick target modules, wrap them, freeze the rest, switch/merge/unload."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.naming import SAVED_STORE, unwrapped_name
from ..layers.adapter_quant import enable_adapter_quant
from ..layers.dropout import plain_dropout, use_fast_dropout
from ..layers.kinds import layer_kind
from ..layers.lora import ADAPTER_STORES, LoRALayer, ModulesToSave
from ..layers.param_lora import ParamLoRA
from ..layers.protocol import QuantizedBase
from ..quant.formats import base_format
from .config import LoraConfig
from .merging import Original, check_merge_target, measured_merge, prepare_merge_base
from .quantize import compute_dtype_of, dequantize_model, quantize_model
from .targeting import (
    candidate_modules,
    find_parameter_targets,
    find_targets,
    name_matches,
    set_submodule,
)
from .transaction import model_transaction
from .walk import walk_modules, walk_parameters

#: Attribute on the model holding ``{adapter_name: LoraConfig}``.
CONFIGS_ATTR = "loraq_configs"
#: Attribute on the model holding ``{adapter_name: [full names of adapted modules]}``.
TARGETS_ATTR = "loraq_targets"


# ---------------------------------------------------------------------------------- iteration
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Every ``LoRALayer`` in ``model`` with its name."""
    for name, module in walk_modules(model, skip_adapter_stores=True):
        if isinstance(module, LoRALayer):
            yield name, module


def param_lora_layers(model: nn.Module) -> Iterator[tuple[str, ParamLoRA]]:
    """Every ``ParamLoRA`` (adapters on a parameter, ``target_parameters``) with its name."""
    for name, module in walk_modules(model, skip_adapter_stores=True):
        if isinstance(module, ParamLoRA):
            yield name, module


def _all_adapter_layers(model: nn.Module) -> Iterator[LoRALayer | ParamLoRA]:
    for _, layer in lora_layers(model):
        yield layer
    for _, layer in param_lora_layers(model):
        yield layer


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in walk_modules(model, skip_adapter_stores=True):
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
    The new adapter becomes the active one (see :func:`set_adapter` to switch). The model's own
    ``nn.Dropout`` layers become :class:`~loraq.layers.dropout.FastDropout` (the same masks,
    drawn faster on CPU); :func:`unload` turns them back.

    ``config.r`` may not exceed ``min(in, out)`` of a targeted layer (a larger rank adds
    parameters, not expressiveness) unless ``allow_large_rank=True``. Everything is checked
    before the model changes, and a call that raises leaves the model exactly as it was.
    """
    plan = plan_apply(model, config, adapter_name, allow_large_rank=allow_large_rank)
    with model_transaction(model, plan.protect):
        apply_planned(model, plan)
    return model


class ApplyPlan(NamedTuple):
    """What :func:`apply` checked and is about to do (:func:`plan_apply`)."""

    config: LoraConfig
    adapter_name: str
    targets: list[str]
    saved: dict[str, list[str]]
    param_targets: list[tuple[str, str]] | None
    #: tensors the change writes in place: the caller's transaction must protect them
    protect: list[torch.Tensor]


def plan_apply(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    allow_large_rank: bool = False,
) -> ApplyPlan:
    """:func:`apply`'s checks, with no change to ``model``; raises what ``apply`` raises."""
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
    if any(layer.merged_adapters for layer in _all_adapter_layers(model)):
        raise RuntimeError(
            "cannot add an adapter while adapters are merged; call loraq.unmerge(model) first"
        )

    targets = find_targets(model, config)
    param_targets = find_parameter_targets(model, config, adapted=targets)
    _check_parameter_sets(configs, config)
    saved = {name: _saved_module_matches(model, name) for name in config.modules_to_save or []}
    _check_targets(model, config, targets, allow_large_rank)
    protect = []
    if config.init == "pissa":  # PiSSA rewrites the base weight in place
        protect = [
            t for n in targets for t in model.get_submodule(n).state_dict(keep_vars=True).values()
        ]
    return ApplyPlan(config, adapter_name, targets, saved, param_targets, protect)


def wrapped_targets(model: nn.Module, plan: ApplyPlan) -> list[LoRALayer] | None:
    """The layers ``plan`` adds its adapter to, when they are all wrapped already and nothing
    else changes (no quantization, LoftQ or PiSSA, no ``modules_to_save``, no adapters on
    parameters, linear layers only); else None. Such a plan can be applied by
    :func:`add_planned_to_wrapped`, touching those layers only."""
    config = plan.config
    if (
        plan.saved
        or plan.param_targets
        or plan.protect
        or config.quant is not None
        or config.init not in ("kaiming", "gaussian")
    ):
        return None
    layers = [model.get_submodule(name) for name in plan.targets]
    if not all(isinstance(m, LoRALayer) and m.kind == "linear" for m in layers):
        return None
    return layers


def add_planned_to_wrapped(model: nn.Module, plan: ApplyPlan, layers: list[LoRALayer]) -> None:
    """``plan``'s adapter on ``layers`` (:func:`wrapped_targets`), at the cost of one adapter
    however many the model holds: no walk of the model. Unlike :func:`apply` it activates
    nothing and changes no ``requires_grad`` but its own (its parameters are frozen), which is
    what a server adding adapters to a model in eval mode wants. The caller holds a
    ``model_transaction`` over ``model`` and ``layers`` (``modules=``) and loads every tensor
    of the adapter next: its factors start at zero, no random init drawn (``loaded_next``)."""
    config = plan.config
    options = {"init": config.init, "use_rslora": config.use_rslora, "use_dora": config.use_dora}
    for layer in layers:
        layer.add_adapter(
            plan.adapter_name, config.r, config.alpha, config.dropout, loaded_next=True, **options
        )
        if config.adapter_bits is not None:
            enable_adapter_quant(layer, plan.adapter_name, config.adapter_bits)
        for param in layer.adapter_parameters(plan.adapter_name):
            param.requires_grad_(False)
        use_fast_dropout(layer.lora_dropout[plan.adapter_name])  # not every adapter's again
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR, {})
    configs[plan.adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    targets_by_adapter = getattr(model, TARGETS_ATTR, {})
    targets_by_adapter[plan.adapter_name] = plan.targets
    setattr(model, TARGETS_ATTR, targets_by_adapter)


def apply_planned(model: nn.Module, plan: ApplyPlan) -> None:
    """:func:`apply`'s changes, checked by :func:`plan_apply`. The caller holds a
    ``model_transaction(model, plan.protect)`` (one snapshot for a larger change, as
    ``install_adapter`` makes: a snapshot of a model with many adapters is not free)."""
    _apply_checked(
        model, plan.config, plan.adapter_name, plan.targets, plan.saved, plan.param_targets
    )


def _check_parameter_sets(configs: dict[str, LoraConfig], config: LoraConfig) -> None:
    # Each adapter's file names follow the nesting of the wrappers, which the first adapter
    # fixed; PEFT refuses a different set for the same reason.
    mine = set(config.target_parameters or [])
    for other, other_config in configs.items():
        theirs = set(other_config.target_parameters or [])
        if mine and theirs and mine != theirs:
            raise ValueError(
                f"LoraConfig.target_parameters={sorted(mine)} differs from adapter {other!r}'s "
                f"{sorted(theirs)}; all adapters on parameters must target the same ones"
            )


def _add_parameter_adapters(
    model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[tuple[str, str]]
) -> None:
    """Wrap each targeted parameter (reusing a wrapper an earlier adapter made) and add the
    adapter; a new wrapper goes around what sits at the module's path, as PEFT nests them."""
    for module_name, param_name in targets:
        outer = model.get_submodule(module_name)
        wrapper = outer
        while isinstance(wrapper, ParamLoRA) and wrapper.parameter_name != param_name:
            wrapper = wrapper.base_layer
        if not isinstance(wrapper, ParamLoRA):
            wrapper = ParamLoRA(outer, param_name)
            set_submodule(model, module_name, wrapper)
        wrapper.add_adapter(
            adapter_name, config.r, config.alpha, init=config.init, use_rslora=config.use_rslora
        )
        if config.quant is not None and not name_matches(module_name, config.quant_skip or []):
            wrapper.quantize_base(
                base_format(config.quant, "LoraConfig.quant"),
                blocksize=config.blocksize,
                double_quant=config.double_quant,
                compute_dtype=compute_dtype_of(config, wrapper.base_param().device),
            )


def _apply_checked(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    targets: list[str],
    saved: dict[str, list[str]],
    param_targets: list[tuple[str, str]] | None = None,
) -> None:
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR, {})
    loftq: dict = {}
    if config.init == "loftq":
        from .loftq import REPORT_ATTR, quantize_model_loftq

        loftq = quantize_model_loftq(model, config, targets)
    elif config.quant is not None:
        quantize_model(model, config, adapted=targets)

    unique = dict.fromkeys(full for matches in saved.values() for full in matches)
    _add_saved_module(model, list(unique), adapter_name)

    init = "kaiming" if config.init == "loftq" else config.init  # LoftQ's factors come next
    options = {"init": init, "use_rslora": config.use_rslora, "use_dora": config.use_dora}
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoRALayer):
            module = LoRALayer(module)  # in the module's train/eval mode (follow_base_mode)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name, config.r, config.alpha, config.dropout, **options)
        if name in loftq:
            _set_factors(module, adapter_name, loftq[name])
        if config.adapter_bits is not None:
            enable_adapter_quant(module, adapter_name, config.adapter_bits)
    _add_parameter_adapters(model, config, adapter_name, param_targets or [])

    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    targets_by_adapter = getattr(model, TARGETS_ATTR, {})
    targets_by_adapter[adapter_name] = targets
    setattr(model, TARGETS_ATTR, targets_by_adapter)
    use_fast_dropout(model)  # the model's own dropout: the same masks, drawn by loraq's kernel
    if loftq:
        reports = getattr(model, REPORT_ATTR, {})
        reports[adapter_name] = loftq
        setattr(model, REPORT_ATTR, reports)
    set_adapter(model, adapter_name)


@torch.no_grad()
def _set_factors(layer: LoRALayer, adapter_name: str, report) -> None:
    a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    a.copy_(report.a.to(a.dtype))
    b.copy_(report.b.to(b.dtype))
    report.a = report.b = None  # the adapter holds them now


def _saved_module_matches(model: nn.Module, name: str) -> list[str]:
    matches = [n for n, m in candidate_modules(model) if n and name_matches(n, [name])]
    if not matches:
        raise ValueError(
            f"LoraConfig.modules_to_save entry {name!r} matches no module in the model"
        )
    return matches


def _rank_limit(module: nn.Module) -> int:
    """``min`` of the adapter matrix shape for ``module`` (rows of B, columns of A)."""
    if isinstance(module, LoRALayer):
        module = module.base_layer
    if isinstance(module, QuantizedBase):
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
        if config.r > limit and (not allow_large_rank or config.init in ("pissa", "loftq")):
            raise ValueError(
                f"LoraConfig.r={config.r} is invalid for module {name!r}: expected at most "
                f"min(in, out) = {limit} (a larger rank adds parameters but no expressiveness; "
                "pass allow_large_rank=True to loraq.apply to allow it)"
            )
        kind = layer_kind(inner)
        if config.use_dora and not kind.supports_dora:
            raise ValueError(
                f"LoraConfig.use_dora=True is invalid for module {name!r}: DoRA is not "
                "supported for nn.Embedding layers; exclude it or target Linear/Conv layers"
            )
        if config.init == "pissa":
            try:
                kind.check_pissa(inner)
            except ValueError:
                raise ValueError(
                    f"LoraConfig.init='pissa' is invalid for module {name!r}: PiSSA on a "
                    "convolution needs a 1x1 kernel"
                ) from None


def _add_saved_module(model: nn.Module, matches: list[str], adapter_name: str) -> None:
    for full in matches:
        module = model.get_submodule(full)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, full, module)
        module.add_adapter(adapter_name)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active (and the only trainable) adapter.

    What trains is exactly the parameters :func:`adapter_state_dict` returns for ``name``.
    """
    _require_adapter(model, name)
    layers = list(_all_adapter_layers(model))  # unmerge below changes no wrapper
    merged = sorted({a for layer in layers for a in layer.merged_adapters})
    if merged and merged != [name]:
        # A merged adapter stays in the base weights whatever is active; switching without
        # unmerging would compute base + old + new. PEFT unmerges here too.
        warnings.warn(
            f"set_adapter({name!r}): unmerging adapter(s) {merged} first", UserWarning, stacklevel=2
        )
        unmerge(model)
    for param in walk_parameters(model):
        param.requires_grad_(False)
    for layer in layers:
        layer.active_adapters = [name] if name in layer.r else []
    for _, saved in _saved_modules(model):
        saved.active_adapter = name
    for tensor in _adapter_tensors(model, name).values():
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None."""
    for layer in _all_adapter_layers(model):
        if layer.active_adapters:
            return layer.active_adapters[0]
    return None


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes exactly as the base model."""
    layers = [*_all_adapter_layers(model)] + [m for _, m in _saved_modules(model)]
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
    for layer in _all_adapter_layers(model):
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


def _dense_base_weights(model: nn.Module, merged_only: bool = False) -> list[torch.Tensor]:
    """The dense base weights a merge or unmerge writes in place (quantized bases get new
    tensors instead), for :func:`~loraq.model.transaction.model_transaction` to protect;
    ``merged_only``: just those of layers holding a merged adapter (what unmerging writes)."""
    return [
        layer.base_layer.weight
        for _, layer in lora_layers(model)
        if not layer.is_quantized and (layer.merged_adapters or not merged_only)
    ] + [
        layer.base_param()
        for _, layer in param_lora_layers(model)
        if not layer.is_quantized and (layer.merged_adapters or not merged_only)
    ]


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (outputs unchanged up to rounding).

    On a quantized base the merged weight is re-quantized, which is lossy: the largest absolute
    weight change this caused is stored in ``model.loraq_merge_error`` and reported in a warning.
    All or nothing: a failure in any layer leaves every layer (and the outputs) as it was.
    """
    worst = 0.0
    quantized = False
    with model_transaction(model, _dense_base_weights(model)):
        for layer in _all_adapter_layers(model):
            worst = max(worst, layer.merge())
            quantized = quantized or layer.is_quantized
        if quantized:
            model.loraq_merge_error = worst
    if quantized:
        warnings.warn(
            f"merged adapters into a quantized base: re-quantization changed weights by up to {worst:.3g} "
            "(use loraq.unload(model, dense=True) for an exact dense merge)",
            UserWarning,
            stacklevel=2,
        )
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights up to float rounding (all or nothing)."""
    with model_transaction(model, _dense_base_weights(model, merged_only=True)):
        for layer in _all_adapter_layers(model):
            layer.unmerge()
    return model


def unload(
    model: nn.Module,
    merge_adapters: bool = True,
    dense: bool = False,
    *,
    merge_into: str | None = None,
    original: Original | None = None,
    calibration: Any = None,
    merge_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Remove all wrappers, returning the plain model (with the active adapter merged by default).

    ``modules_to_save`` are replaced by the active adapter's trained copy. A quantized base stays
    quantized (merging re-quantizes) unless ``dense=True``: then every quantized layer is
    dequantized first and the adapters merge exactly into dense weights.

    ``merge_into`` makes the choice explicit (see :mod:`loraq.model.merging`): ``"dequantized"`` (what
    ``dense=True`` means: exact), ``"original"`` (onto ``original``'s pre-quantization weights,
    a model or state dict, as PEFT merges: lossy) or ``"requantize"`` (back into the same
    quantized format). With ``merge_into``, or ``dense=True`` with a merge, the merged model is
    compared with the unmerged one on ``calibration`` (token ids or a dict of inputs; default:
    random token ids when the model has ``config.vocab_size``) and ``model.loraq_merge_report``
    holds the largest output difference and the KL divergence (:class:`~loraq.model.merging.MergeReport`).
    ``merge_dtype`` (dense merges): the dtype every floating tensor is cast to before merging.

    All or nothing: the arguments (and ``original``'s tensors) are checked before the model
    changes, and a failure half-way (a layer that cannot be merged, out of memory) restores the
    model exactly, bit for bit.
    """
    if merge_into is not None or (dense and merge_adapters):
        into = merge_into or "dequantized"
        if dense and into != "dequantized":
            raise ValueError(f"unload: dense=True contradicts merge_into={into!r}")
        if not merge_adapters:
            raise ValueError("unload: merge_into needs merge_adapters=True")
        check_merge_target(into, original)
        with (
            model_transaction(model, _dense_base_weights(model)),
            measured_merge(model, into, calibration) as report,
        ):
            if into == "dequantized":
                _dequantize_parameter_bases(model)
            prepare_merge_base(model, into, original, merge_dtype)
            report.max_weight_change = _unwrap(model, merge_adapters=True)
        return model
    with model_transaction(model, _dense_base_weights(model) if merge_adapters else []):
        if dense:  # without a merge: the adapters are dropped, the base becomes dense
            _dequantize_parameter_bases(model)
            for _, layer in lora_layers(model):
                if layer.is_quantized:
                    layer.unmerge()
            dequantize_model(model)
        _unwrap(model, merge_adapters)
    return model


def _dequantize_parameter_bases(model: nn.Module) -> None:
    """Quantized expert stacks become dense parameters again (exact merges follow)."""
    for _, layer in param_lora_layers(model):
        layer.dequantize_base()


def _unwrap(model: nn.Module, merge_adapters: bool) -> float:
    """Replace every wrapper by its base (merging the active adapter first if asked); returns
    the largest change re-quantizing a merged weight made (0.0 over dense bases)."""
    worst = 0.0
    for name, layer in list(lora_layers(model)):
        if merge_adapters:
            worst = max(worst, layer.merge())
        set_submodule(model, name, layer.base_layer)
    for name in dict.fromkeys(unwrapped_name(n) for n, _ in param_lora_layers(model)):
        while isinstance(outer := model.get_submodule(name), ParamLoRA):
            if merge_adapters:
                worst = max(worst, outer.merge())
            set_submodule(model, name, outer.release())
    for name, saved in list(_saved_modules(model)):
        active = saved.active_adapter
        keep = (
            saved.modules_to_save[active]
            if active in saved.modules_to_save
            else saved.original_module
        )
        set_submodule(model, name, keep)
    for attr in (CONFIGS_ATTR, TARGETS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    plain_dropout(model)  # a plain model again, with nothing of loraq's left in it
    for param in model.parameters():
        param.requires_grad_(False)
    return worst


def _adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors by model name, as the live parameters and buffers."""
    config: LoraConfig = getattr(model, CONFIGS_ATTR)[name]
    out: dict[str, torch.Tensor] = {}
    saved = dict(_saved_modules(model))
    for lname, layer in lora_layers(model):
        if name not in layer.r:
            continue
        for store in ADAPTER_STORES:
            held = getattr(layer, store)
            if name not in held:
                continue
            entry = held[name]
            if isinstance(entry, nn.Module):
                for key, tensor in entry.state_dict(keep_vars=True).items():
                    out[f"{lname}.{store}.{name}.{key}"] = tensor
            else:
                out[f"{lname}.{store}.{name}"] = entry
        if config.bias == "lora_only" and layer.bias is not None:
            out[f"{lname}.base_layer.bias"] = layer.bias
    for lname, layer in param_lora_layers(model):
        if name in layer.r:
            out[f"{lname}.lora_A.{name}.weight"] = layer.lora_A[name].weight
            out[f"{lname}.lora_B.{name}.weight"] = layer.lora_B[name].weight
    for sname, wrapper in saved.items():
        if name in wrapper.modules_to_save:
            copy = wrapper.modules_to_save[name]
            for key, tensor in copy.state_dict(keep_vars=True).items():
                out[f"{sname}.{SAVED_STORE}.{name}.{key}"] = tensor
    if config.bias == "all":
        # Every bias outside modules_to_save trains (those train, and save, with their module).
        inside_saved = tuple(f"{n}." for n in saved)
        for key, param in model.named_parameters():
            if (
                key.endswith("bias")
                and param.is_floating_point()
                and not key.startswith(inside_saved)
            ):
                out[key] = param
    return out


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` (default: active), keyed by their names in ``model``.

    Exactly what the adapter trains and what :func:`loraq.save_adapter` writes: its LoRA factors
    (and DoRA magnitudes), its copies of ``modules_to_save`` (with their buffers), and the biases
    ``config.bias`` trains (``"lora_only"``: those of adapted modules; ``"all"``: every bias).
    """
    name = name or active_adapter(model)
    if name is None:
        raise ValueError("model has no adapters")
    _require_adapter(model, name)
    return {key: tensor.detach() for key, tensor in _adapter_tensors(model, name).items()}


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
