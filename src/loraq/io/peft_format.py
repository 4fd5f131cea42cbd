"""Adapters in PEFT's file layout, both ways: ``save_adapter`` and ``load_adapter``.

A folder holds ``adapter_config.json`` (see :mod:`loraq.io.peft_config`) and
``adapter_model.safetensors``. Tensor keys are the in-memory names with the adapter name removed
and ``base_model.model.`` in front, exactly as PEFT 0.22 writes them:

==========================================  ==========================================
in memory (loraq and PEFT)                  on disk
==========================================  ==========================================
``<m>.lora_A.<adapter>.weight``             ``base_model.model.<m>.lora_A.weight``
``<m>.lora_embedding_A.<adapter>``          ``base_model.model.<m>.lora_embedding_A``
``<m>.lora_magnitude_vector.<adapter>``     ``base_model.model.<m>.lora_magnitude_vector``
``<m>.modules_to_save.<adapter>.<p>``       ``base_model.model.<m>.<p>``
``<m>.base_layer.bias`` (bias != "none")    ``base_model.model.<m>.base_layer.bias``
==========================================  ==========================================

Adapters on parameters (``target_parameters``) use the same keys at the module holding the
parameter; a second parameter of that module nests one ``base_layer.`` deeper
(``<m>.base_layer.lora_A.weight``), in PEFT's order (see :mod:`loraq.layers.param_lora`).

Adapters trained with ``adapter_bits=k`` may instead be stored as integer codes (see
:mod:`loraq.io.adapter_codes`) in ``adapter_model.codes.safetensors``; PEFT cannot read those, and
the different file name makes it fail loudly instead of loading random weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core.naming import disk_key, memory_key
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.param_lora import ParamLoRA
from ..layers.protocol import QuantizedBase
from ..model.config import LoraConfig
from ..model.surgery import (
    CONFIGS_ATTR,
    adapter_names,
    adapter_state_dict,
    add_planned_to_wrapped,
    apply_planned,
    plan_apply,
    wrapped_targets,
)
from ..model.targeting import find_targets
from ..model.transaction import model_transaction
from ..model.walk import walk_modules
from . import adapter_codes
from .adapter_check import check_adapter_shapes, check_finite
from .peft_config import ADAPTER_BITS_FIELD, CONFIG_NAME, lora_config_from_peft, peft_config_dict
from .safe import (
    PICKLE_SUFFIXES,
    FormatError,
    atomic_save_safetensors,
    atomic_write_json,
    parse_safetensors,
    read_bytes,
    read_json,
    read_safetensors,
    refuse_pickle,
    staged_folder,
    weights_file,
)

WEIGHTS_NAME = "adapter_model.safetensors"
CODES_WEIGHTS_NAME = "adapter_model.codes.safetensors"
#: Key prefix PEFT puts before the base model's module paths.
PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------- tensors
def _wrappers(model: nn.Module) -> tuple[dict[str, LoRALayer], dict[str, ModulesToSave]]:
    layers: dict[str, LoRALayer] = {}
    saved: dict[str, ModulesToSave] = {}
    for name, module in walk_modules(model, skip_adapter_stores=True):
        if isinstance(module, LoRALayer):
            layers[name] = module
        elif isinstance(module, ModulesToSave):
            saved[name] = module
    return layers, saved


def adapter_tensors(
    model: nn.Module, adapter: str, *, save_embedding_layers: bool | None = None
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s tensors under their on-disk keys (``base_model.model.`` prefix).

    The tensors are :func:`loraq.adapter_state_dict`'s (what the adapter trains), plus the frozen
    base weight of adapted embeddings when ``save_embedding_layers`` asks for it.

    Args:
        save_embedding_layers: also store the base weight of adapted embeddings
            (``<m>.base_layer.weight``); None does what PEFT's ``"auto"`` does: yes whenever an
            embedding carries this adapter.
    """
    out = {disk_key(k, adapter): t for k, t in adapter_state_dict(model, adapter).items()}
    if save_embedding_layers is not False:
        layers, _ = _wrappers(model)
        for name, layer in layers.items():
            if adapter in layer.r and layer.kind == "embedding":
                if isinstance(layer.base_layer, nn.Embedding):
                    out[f"{name}.base_layer.weight"] = layer.base_layer.weight.detach()
    return {PREFIX + key: t for key, t in sorted(out.items())}


def _model_key(key: str, adapter: str, saved: dict[str, ModulesToSave]) -> str:
    """The in-memory name (adapter ``adapter``) for an on-disk key without the prefix."""
    name = memory_key(key, adapter)
    if name is not None:
        return name
    for name in saved:
        if key.startswith(name + "."):
            rest = key[len(name) + 1 :]
            # PEFT's bias="all" files also hold "<m>.modules_to_save.<p>" (the trained copy
            # again) and "<m>.original_module.<p>" (the frozen original's bias).
            if rest.startswith("original_module."):
                return key
            rest = rest.removeprefix("modules_to_save.")
            return f"{name}.modules_to_save.{adapter}.{rest}"
    return key


def expected_keys(model: nn.Module, adapter: str) -> set[str]:
    """In-memory names of the tensors a file must provide for adapter ``adapter``."""
    layers, saved = _wrappers(model)
    keys: set[str] = set()
    for name, layer in layers.items():
        if adapter not in layer.r:
            continue
        if layer.kind == "embedding":
            keys |= {f"{name}.lora_embedding_A.{adapter}", f"{name}.lora_embedding_B.{adapter}"}
        else:
            keys |= {f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"}
        if layer.use_dora.get(adapter):
            keys.add(f"{name}.lora_magnitude_vector.{adapter}")
    for name, wrapper in saved.items():
        if adapter in wrapper.modules_to_save:
            for key in wrapper.modules_to_save[adapter].state_dict():
                keys.add(f"{name}.modules_to_save.{adapter}.{key}")
    for name, module in walk_modules(model, skip_adapter_stores=True):  # target_parameters
        if isinstance(module, ParamLoRA) and adapter in module.r:
            keys |= {f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"}
    return keys


def load_adapter_tensors(
    model: nn.Module,
    adapter: str,
    tensors: dict[str, torch.Tensor],
    source: str,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy on-disk ``tensors`` into adapter ``adapter`` of ``model``; strict about keys/shapes.

    ``state``: the model tensors the file may write, by model name (default: the whole
    ``state_dict``; an adapter's own tensors when nothing else can be in its file).

    Raises :class:`FormatError` listing missing and unexpected keys, or naming a key whose shape
    differs from the model's (both shapes given).
    """
    _, saved = _wrappers(model)
    if state is None:
        state = model.state_dict(keep_vars=True)
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            unexpected.append(key)
            continue
        name = _model_key(key[len(PREFIX) :], adapter, saved)
        if name in state:
            mapped[name] = (key, tensor)
        else:
            unexpected.append(key)
    missing = sorted(expected_keys(model, adapter) - set(mapped))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {[PREFIX + disk_key(k, adapter) for k in missing]}")
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)}")
        raise FormatError(f"{source} does not fit the model: " + "; ".join(parts))
    for name, (key, tensor) in mapped.items():
        target = state[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise FormatError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the model "
                f"expects {tuple(target.shape)}"
            )
    # Convert everything first, so the in-place copies below cannot fail half-way.
    ready = {name: tensor.to(state[name].dtype) for name, (_, tensor) in mapped.items()}
    with torch.no_grad():
        for name, tensor in ready.items():
            state[name].copy_(tensor)


# ---------------------------------------------------------------------------------- folders
def _model_card(config: dict) -> str:
    base = config.get("base_model_name_or_path") or ""
    return (
        "---\n"
        f"base_model: {base!r}\n"
        "library_name: peft\n"
        "tags:\n- loraq\n- lora\n"
        "---\n\n"
        "# LoRA adapter\n\n"
        f"Saved by loraq in the PEFT {config['peft_version']} layout: rank {config['r']}, "
        f"alpha {config['lora_alpha']}, targets {config['target_modules']!r}.\n\n"
        "Load with `loraq.load_adapter(model, path)` or "
        "`peft.PeftModel.from_pretrained(model, path)`.\n"
    )


def _write_one(
    folder: Path,
    model: nn.Module,
    adapter: str,
    *,
    dequantize: bool,
    save_embedding_layers: bool | None,
    write_card: bool,
) -> None:
    config: LoraConfig = getattr(model, CONFIGS_ATTR)[adapter]
    data = peft_config_dict(model, adapter, config)
    tensors = adapter_tensors(model, adapter, save_embedding_layers=save_embedding_layers)
    folder.mkdir(parents=True, exist_ok=True)
    if config.adapter_bits is not None and not dequantize:
        tensors = adapter_codes.encode(tensors, config.adapter_bits)
        data[ADAPTER_BITS_FIELD] = config.adapter_bits
        atomic_save_safetensors(folder / CODES_WEIGHTS_NAME, tensors)
    else:
        if config.adapter_bits is not None:
            tensors = adapter_codes.grid_values(tensors, config.adapter_bits)
        atomic_save_safetensors(folder / WEIGHTS_NAME, tensors)
    atomic_write_json(folder / CONFIG_NAME, data)
    if write_card:
        (folder / "README.md").write_text(_model_card(data), encoding="utf-8")


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str | None = None,
    *,
    dequantize: bool = False,
    save_embedding_layers: bool | None = None,
) -> Path:
    """Write adapters in PEFT 0.22's layout; returns the folder.

    ``adapter_config.json`` (all 41 PEFT fields, sorted, ``indent=2``), ``adapter_model.safetensors``
    (metadata ``{"format": "pt"}``) and a short ``README.md`` (kept if one exists). The folder is
    staged next to ``path`` and moved into place, so a failure leaves nothing half-written.

    Args:
        model: a model prepared with :func:`loraq.apply` (or :func:`load_adapter`).
        path: output folder (created; other files in it are left alone).
        adapter_name: save only this adapter, at ``path``. None saves every adapter as PEFT
            does: ``"default"`` (or the first adapter if none has that name) at ``path``, each
            other one in ``path/<name>/``.
        dequantize: for adapters trained with ``adapter_bits``, write plain float weights (on
            the k-bit grid) that PEFT reads, instead of integer codes + scales.
        save_embedding_layers: see :func:`adapter_tensors`.
    """
    names = adapter_names(model)
    if not names:
        raise ValueError("save_adapter: the model has no loraq adapters (use loraq.apply first)")
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"save_adapter: no adapter {adapter_name!r}; adapters: {names}")
        layout = {adapter_name: ""}
    else:
        root = "default" if "default" in names else names[0]
        layout = {n: ("" if n == root else n) for n in names}
    with staged_folder(path) as staging:
        for name, sub in layout.items():
            _write_one(
                staging / sub,
                model,
                name,
                dequantize=dequantize,
                save_embedding_layers=save_embedding_layers,
                write_card=not (Path(path) / sub / "README.md").exists(),  # keep the user's card
            )
    for name, sub in layout.items():
        # A weights file of the other kind from an earlier save would be stale: PEFT would read
        # an old adapter_model.safetensors next to a new codes file.
        codes = getattr(model, CONFIGS_ATTR)[name].adapter_bits is not None and not dequantize
        stale = WEIGHTS_NAME if codes else CODES_WEIGHTS_NAME
        (Path(path) / sub / stale).unlink(missing_ok=True)
    return Path(path)


def is_adapter_folder(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds a PEFT adapter (its ``adapter_config.json``)."""
    return (Path(folder) / CONFIG_NAME).is_file()


def adapter_base_model(folder: str | os.PathLike[str]) -> str | None:
    """The base model an adapter folder names (``base_model_name_or_path`` in its
    ``adapter_config.json``), or None when it names none. Raises :class:`FormatError` naming
    the file when the folder has no readable config."""
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.is_file():
        raise FormatError(f"{folder} has no {CONFIG_NAME}: not an adapter folder")
    base = read_json(config_file).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def _adapter_folder(path: Path, adapter_name: str) -> Path:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        raise FormatError(f"{path} is a file; load_adapter expects the adapter's folder")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist")
    if (path / adapter_name / CONFIG_NAME).is_file():
        return path / adapter_name  # PEFT's sub-folder for a non-default adapter
    if (path / CONFIG_NAME).is_file():
        return path
    raise FormatError(f"{path} has no {CONFIG_NAME}")


class AdapterBytes(NamedTuple):
    """An adapter folder read and not yet parsed (:func:`read_adapter_bytes`): its config, the
    bits of its integer codes (None: float weights), its weights file and that file's bytes."""

    config: LoraConfig
    bits: int | None
    weights: Path
    data: bytes


def _adapter_files(
    path: str | os.PathLike[str], adapter_name: str
) -> tuple[LoraConfig, int | None, Path]:
    """An adapter folder's config (checked), the bits of its integer codes (None: float
    weights) and its weights file."""
    folder = _adapter_folder(Path(path), adapter_name)
    config_file = folder / CONFIG_NAME
    config, bits = lora_config_from_peft(read_json(config_file), source=str(config_file))
    return config, bits, weights_file(folder, WEIGHTS_NAME if bits is None else CODES_WEIGHTS_NAME)


def _float_tensors(
    tensors: dict[str, torch.Tensor], bits: int | None, weights: Path
) -> dict[str, torch.Tensor]:
    """A weights file's tensors as floats (integer codes decoded), checked for NaN and Inf."""
    if bits is not None:
        tensors = adapter_codes.decode(tensors, bits, source=str(weights))
    check_finite(tensors, str(weights))
    return tensors


def read_adapter_bytes(path: str | os.PathLike[str], adapter_name: str = "default") -> AdapterBytes:
    """The disk half of :func:`read_adapter`: the folder's config, checked, and its weights
    file's bytes. Little work besides the reads, so a server runs it on a worker thread and
    parses (:func:`parse_adapter_bytes`) where the tensors are wanted."""
    config, bits, weights = _adapter_files(path, adapter_name)
    return AdapterBytes(config, bits, weights, read_bytes(weights))


def parse_adapter_bytes(read: AdapterBytes) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """The other half of :func:`read_adapter`: ``(config, tensors, weights file)`` of what
    :func:`read_adapter_bytes` read; the tensors own their memory."""
    tensors = parse_safetensors(read.data, read.weights)
    return read.config, _float_tensors(tensors, read.bits, read.weights), read.weights


def read_adapter(
    path: str | os.PathLike[str], adapter_name: str = "default", *, owned: bool = False
) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """Read and check an adapter folder without touching a model: ``(config, tensors, weights file)``.

    Tensors are float, whatever the file stored (integer codes are decoded). ``owned=True``:
    no tensor maps the weights file (it is read into memory whole, as
    :func:`read_adapter_bytes` and :func:`parse_adapter_bytes` do), so they stay valid when the
    file is rewritten.
    """
    if owned:
        return parse_adapter_bytes(read_adapter_bytes(path, adapter_name))
    config, bits, weights = _adapter_files(path, adapter_name)
    tensors, _ = read_safetensors(weights)
    return config, _float_tensors(tensors, bits, weights), weights


def _drop_absent_saved_modules(model: nn.Module, config: LoraConfig) -> LoraConfig:
    # PEFT's SEQ_CLS configs list both "classifier" and "score" and ignore whichever the model
    # lacks; loraq.apply would reject the missing one.
    if not config.modules_to_save:
        return config
    names = [n for n, _ in model.named_modules() if n]
    present = [
        s for s in config.modules_to_save if any(n == s or n.endswith("." + s) for n in names)
    ]
    return config.replace(modules_to_save=present or None)


#: ``LoraConfig`` fields a PEFT file cannot carry, which ``load_adapter`` accepts as keywords.
BASE_OPTIONS = (
    "quant",
    "double_quant",
    "blocksize",
    "compute_dtype",
    "quant_skip",
    "quant_embeddings",
)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    **base_options: Any,
) -> nn.Module:
    """Load an adapter folder written by loraq or PEFT onto ``model``; returns ``model``.

    ``model`` may be a plain model (adapters are added with :func:`loraq.apply`) or one that
    already has adapters (this one is added next to them). The loaded adapter becomes active.
    ``path`` is the folder with ``adapter_config.json``; when ``path/<adapter_name>/`` holds one
    (PEFT's layout for a non-default adapter, as :func:`save_adapter` writes), that one is read.

    ``base_options`` are the loraq settings for the frozen base that a PEFT file does not record
    (:data:`BASE_OPTIONS`): ``load_adapter(dense_model, path, quant="nf4")`` rebuilds the NF4 base
    a QLoRA adapter was trained on (quantization is deterministic, so the bytes are the same).
    A base that is quantized already (:func:`loraq.load_quantized`) needs no options.

    Raises :class:`loraq.io.FormatError` (a ``ValueError``) for pickle files, unknown or
    unsupported config fields, corrupt safetensors, missing/unexpected keys and wrong shapes.
    """
    _check_base_options(base_options, "load_adapter")
    config, tensors, weights = read_adapter(path, adapter_name)
    return install_adapter(model, config, tensors, weights, adapter_name, **base_options)


def _check_base_options(base_options: dict[str, Any], caller: str) -> None:
    unknown = sorted(set(base_options) - set(BASE_OPTIONS))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected option(s) {unknown}; allowed: {list(BASE_OPTIONS)} "
            "(the adapter's own settings come from adapter_config.json)"
        )


def install_adapter(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    weights: Path,
    adapter_name: str = "default",
    *,
    activate: bool = True,
    **base_options: Any,
) -> nn.Module:
    """The second half of :func:`load_adapter`: add an adapter :func:`read_adapter` returned
    (``config, tensors, weights``) to ``model``, all or nothing; returns ``model``.

    Reading and parsing touch no model, so a server reads on a worker thread and holds its
    model lock only for this part. ``tensors`` are copied, never kept, so one read may be
    installed again later (after an eviction).

    ``activate=False`` leaves the active adapter and every ``requires_grad`` flag as they are
    (the new adapter's parameters frozen). When the adapter's layers are wrapped already (a
    model holding other adapters over the same modules), it then touches those layers only,
    so its cost is one adapter's, not the model's (:func:`loraq.model.surgery.add_planned_to_wrapped`).
    """
    _check_base_options(base_options, "install_adapter")
    config = _drop_absent_saved_modules(model, config.replace(**base_options))
    # Check the file against its config and the model before allocating anything, then change
    # the model as one transaction: a failure leaves it exactly as it was.
    check_adapter_shapes(model, config, find_targets(model, config), tensors, PREFIX, str(weights))
    onto_saved_base = config.init == "loftq" and config.quant is None
    if not activate and not onto_saved_base:
        plan = plan_apply(model, config, adapter_name, allow_large_rank=True)
        layers = wrapped_targets(model, plan)
        if layers is not None:
            # the layers and their adapter tables; the base layers are not touched
            touched = [model, *layers]
            touched += [c for m in layers for c in m.children() if c is not m.base_layer]
            with model_transaction(model, modules=touched):
                add_planned_to_wrapped(model, plan, layers)
                # nothing but the adapter's own tensors can be in its file here (linear
                # layers only: no embedding base weights), and aliases of them load in place
                state = adapter_state_dict(model, adapter_name)
                load_adapter_tensors(model, adapter_name, tensors, str(weights), state=state)
            return model
    # A LoftQ base saved quantized (loraq.load_quantized) already holds LoftQ's Q: only A and
    # B load. With quant= given instead, apply() replays LoftQ on dense weights.
    # A PEFT file may hold a rank above min(in, out); its tensors are checked above.
    applied = config.replace(init="kaiming") if onto_saved_base else config
    plan = plan_apply(model, applied, adapter_name, allow_large_rank=True)
    with model_transaction(model, plan.protect):  # one snapshot for apply and the tensors
        apply_planned(model, plan)
        if onto_saved_base:
            getattr(model, CONFIGS_ATTR)[adapter_name] = config
            _require_quantized_bases(model, adapter_name, str(weights))
        load_adapter_tensors(model, adapter_name, tensors, source=str(weights))
    return model


def _require_quantized_bases(model: nn.Module, adapter: str, source: str) -> None:
    layers = [m for m in model.modules() if isinstance(m, LoRALayer) and adapter in m.r]
    if not any(isinstance(m.base_layer, QuantizedBase) for m in layers):
        raise FormatError(
            f"{source}: a LoraConfig.init='loftq' adapter needs the quantized base it was made "
            "with: load that base with loraq.load_quantized, or pass quant='nf4'/'fp4'/'int8' "
            "to replay LoftQ on the dense model"
        )
