"""Which modules a config selects, and how a module in a model is replaced.

The one home of the model-tree rules that adapting (:mod:`loraq.model.surgery`), quantizing
(:mod:`loraq.model.quantize`), compressing (:mod:`loraq.model.decompose`) and the file formats
(:mod:`loraq.io`) share:

=========================  ==================================================================
rule                       function
=========================  ==================================================================
name patterns              :func:`name_matches` (PEFT's: regex fullmatch, or dotted suffix)
output heads               :func:`output_head_names` (left alone by ``"all-linear"``)
modules that may change    :func:`candidate_modules` (the insides of wrappers are skipped)
what ``targets`` selects   :func:`find_targets`
``target_parameters``      :func:`find_parameter_targets` (PEFT's order, which fixes the nesting)
replacing a module         :func:`set_submodule`
a wrapped module's name    :func:`unwrapped_name` (drops ``base_layer`` / ``original_module``)
=========================  ==================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from ..core.naming import unwrapped_name
from ..layers.kinds import SUPPORTED_TYPES, is_gpt2_conv1d, layer_kind
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.param_lora import ParamLoRA, param_shape_facts
from ..layers.protocol import QuantizedBase
from .config import LoraConfig
from .walk import walk_modules

__all__ = [
    "HEAD_NAMES",
    "candidate_modules",
    "find_parameter_targets",
    "find_targets",
    "is_linear_like",
    "name_matches",
    "output_head_names",
    "set_submodule",
    "unwrapped_name",
]

#: Top-level module names that ``"all-linear"`` treats as output heads (as PEFT does).
HEAD_NAMES = ("lm_head", "classifier", "score")


def name_matches(name: str, patterns: str | list[str]) -> bool:
    """PEFT's rule: a regex string must fullmatch ``name``; a list entry must equal ``name`` or be
    a dotted suffix of it (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_linear_like(module: nn.Module) -> bool:
    """True for what ``"all-linear"`` adapts and ``quant`` quantizes: ``nn.Linear``, GPT-2
    ``Conv1D`` and loraq's quantized linear layers."""
    return isinstance(module, (nn.Linear, QuantizedBase)) or is_gpt2_conv1d(module)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return None
    try:
        return get_out()
    except NotImplementedError:  # transformers' answer for models without an output layer
        return None
    except Exception as err:
        raise RuntimeError(
            f"{type(model).__name__}.get_output_embeddings() raised {type(err).__name__}: {err}; "
            "loraq cannot tell which module is the output head. Fix the model, or list the "
            "modules in LoraConfig.targets instead of 'all-linear'"
        ) from err


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the module ``get_output_embeddings()`` returns (or a wrapper around it): the
    head that transformers' bitsandbytes loader keeps dense by default, unlike a ``classifier``
    or ``score`` head that :func:`output_head_names` also counts."""
    head = _output_embeddings(model)
    if head is None:
        return set()
    return {
        name
        for name, module in model.named_modules()
        if module is head or (isinstance(module, LoRALayer) and module.base_layer is head)
    }


def output_head_names(model: nn.Module) -> set[str]:
    """Names of output heads that ``"all-linear"`` leaves alone (as PEFT does): the module
    ``get_output_embeddings()`` returns (or a wrapper around it) and top-level modules named
    ``lm_head``, ``classifier`` or ``score``.

    Raises:
        RuntimeError: when ``get_output_embeddings()`` fails with anything other than
            ``NotImplementedError`` (then no head could be recognised safely).
    """
    head = _output_embeddings(model)
    names: set[str] = set()
    for name, module in model.named_modules():
        wraps_head = (
            isinstance(module, LoRALayer) and head is not None and module.base_layer is head
        )
        if (head is not None and module is head) or wraps_head:
            names.add(name)
        elif name in HEAD_NAMES:
            names.add(name)
    return names


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` pairs that may receive adapters; the insides of wrappers are skipped."""
    # most of a model with many adapters lies inside its wrappers: not walked
    yield from walk_modules(model, stop_at=(LoRALayer, ModulesToSave))


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules ``config`` targets; raises if none match or a match is unsupported."""
    if config.targets == []:  # adapters on parameters only (config checks target_parameters)
        return []
    heads = output_head_names(model) if config.targets == "all-linear" else set()
    saved = config.modules_to_save or []
    chosen: list[str] = []
    for name, module in candidate_modules(model):
        if not name or isinstance(module, ModulesToSave) or name_matches(name, saved):
            continue
        inner = module.base_layer if isinstance(module, LoRALayer) else module
        if config.targets == "all-linear":
            hit = is_linear_like(inner) and name not in heads
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
        examples = [n for n, m in candidate_modules(model) if n and layer_kind(m) is not None][:12]
        raise ValueError(
            f"LoraConfig.targets={config.targets!r} matched no module. "
            f"Some adaptable modules in this model: {examples}"
        )
    return chosen


def _parameter_holders(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(unwrapped name, module, wrapped as a module)`` for every module that may hold a
    targeted parameter, in ``named_modules`` order: ``ParamLoRA`` wrappers are seen through, a
    ``LoRALayer`` / ``ModulesToSave`` stands for the module it wraps, adapter stores are skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, LoRALayer):
            skip.append(name + ".")
            yield unwrapped_name(name), module.base_layer, True
        elif isinstance(module, ModulesToSave):
            skip.append(name + ".")
            yield unwrapped_name(name), module.original_module, True
        elif isinstance(module, ParamLoRA):
            skip += [f"{name}.{store}." for store in ("lora_A", "lora_B", "lora_dropout")]
        else:
            yield unwrapped_name(name), module, False


def find_parameter_targets(
    model: nn.Module, config: LoraConfig, adapted: list[str] | None = None
) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` pairs ``config.target_parameters`` selects, in PEFT's
    order (modules as ``named_modules`` lists them, each module's own parameters in registration
    order): the first pair of a module is wrapped innermost, which fixes the file's key names.

    A pattern matches ``"<module>.<param>"`` exactly or as a dotted suffix (PEFT's rule).
    ``adapted``: module names that ``targets`` selects (about to be wrapped as modules).

    Raises:
        ValueError: one line, when nothing matches (naming the patterns), or a match is a
            parameter of the root module, of a module ``targets`` also adapts, or not 2-D/3-D.
    """
    patterns = config.target_parameters or []
    if not patterns:
        return []
    # A quantized stack leaves a None in its module's registry; its wrapper knows the shape.
    quantized = {
        (id(m.holder), m.parameter_name): m.base_shape
        for m in model.modules()
        if isinstance(m, ParamLoRA) and m.is_quantized
    }
    chosen: list[tuple[str, str]] = []
    for name, module, wrapped in _parameter_holders(model):
        for pname, param in module._parameters.items():
            shape = quantized.get((id(module), pname)) if param is None else param.shape
            if shape is None:
                continue
            key = f"{name}.{pname}" if name else pname
            if not name_matches(key, patterns):
                continue
            where = f"LoraConfig.target_parameters matched {key!r}"
            if not name:
                raise ValueError(
                    f"{where}, a parameter of the root module, which cannot be wrapped"
                )
            if wrapped or name in (adapted or []):
                raise ValueError(
                    f"{where}, whose module is adapted or saved as a module already; remove it "
                    "from LoraConfig.targets / modules_to_save (or set targets=[])"
                )
            try:
                param_shape_facts(tuple(shape), False)
            except ValueError as err:
                raise ValueError(f"{where}: {err} supported") from None
            chosen.append((name, pname))
    if not chosen:
        examples = [
            f"{n}.{p}" if n else p
            for n, m, _ in _parameter_holders(model)
            for p, t in m.named_parameters(recurse=False)
            if t.dim() == 3
        ][:6]
        raise ValueError(
            f"LoraConfig.target_parameters={patterns!r} matched no parameter; "
            f"3-D parameters in this model: {examples or 'none'}"
        )
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (which must not be empty)."""
    if not name:
        raise ValueError("set_submodule needs a non-empty module name (cannot replace the root)")
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
