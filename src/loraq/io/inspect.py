"""``loraq inspect PATH``: what an adapter folder, a (4-bit) checkpoint or a GGUF file holds.

Only headers, configs and the tiny quant-state JSON tensors are read, so inspecting a large
checkpoint is fast. Nothing is unpickled: a pickle-only folder gets the usual conversion hint.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..core.naming import adapted_module_of
from ..layers.lora import adapter_scaling
from .adapter_codes import PACKED_MAX_BITS
from .gguf_inspect import format_gguf_inspection, inspect_gguf
from .peft_config import ADAPTER_BITS_FIELD, lora_config_from_peft
from .peft_format import CODES_WEIGHTS_NAME, CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .safe import (
    PICKLE_SUFFIXES,
    FormatError,
    model_weight_files,
    read_json,
    read_safetensors_header,
    refuse_pickle,
    weights_file,
)

_BYTES_PER = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_QSTATE = re.compile(r"(.+)\.weight\.quant_state\.(bitsandbytes|loraq)__(\w+)")


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _BYTES_PER.get(dtype, 0)


# ---------------------------------------------------------------------------------- adapters
def _adapter_folders(root: Path) -> list[tuple[str, Path]]:
    found = []
    if (root / CONFIG_NAME).is_file():
        found.append(("default", root))
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / CONFIG_NAME).is_file():
            found.append((sub.name, sub))
    return found


def _packed_count(file: Path, key: str, shape: tuple[int, ...]) -> int:
    """Codes in a packed (<= 4-bit) ``.codes`` tensor: two per byte along dim 1, less the
    padding (nibble 0) that an odd width leaves in the low nibbles of the last column."""
    if len(shape) < 2 or not math.prod(shape):
        return 2 * math.prod(shape)
    with safe_open(str(file), framework="pt") as f:
        last = f.get_slice(key)[:, shape[1] - 1 : shape[1]]
    padded = bool(((last & 0x0F) == 0).all())
    return 2 * math.prod(shape) - (math.prod(shape) // shape[1] if padded else 0)


def inspect_adapter(folder: Path, name: str = "default") -> dict[str, Any]:
    """Facts about one adapter folder: config summary, modules, parameters and bytes."""
    raw = read_json(folder / CONFIG_NAME)
    bits = raw.get(ADAPTER_BITS_FIELD)
    weights = weights_file(folder, CODES_WEIGHTS_NAME if bits else WEIGHTS_NAME)
    header, metadata = read_safetensors_header(weights)
    modules, params, lora_params, dtypes = set(), 0, 0, {}
    for key, (dtype, shape) in header.items():
        numel = math.prod(shape)
        dtypes[dtype] = dtypes.get(dtype, 0) + numel
        if key.endswith(".scale") and bits:
            continue  # scales of k-bit codes are not parameters of their own
        if bits and bits <= PACKED_MAX_BITS and key.endswith(".codes") and dtype == "U8":
            numel = _packed_count(weights, key, tuple(shape))
        params += numel
        module = adapted_module_of(key.removeprefix(PREFIX))
        if module is not None:
            modules.add(module)
            lora_params += numel
    try:
        lora_config_from_peft(raw, source=str(folder / CONFIG_NAME))
        problem = None
    except FormatError as err:
        problem = str(err)
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    scaling = None
    if isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)):
        scaling = adapter_scaling(alpha, r, bool(raw.get("use_rslora")))
    return {
        "name": name,
        "path": str(folder),
        "peft_type": raw.get("peft_type"),
        "r": r,
        "lora_alpha": alpha,
        "scaling": scaling,
        "use_rslora": raw.get("use_rslora", False),
        "use_dora": raw.get("use_dora", False),
        "target_modules": raw.get("target_modules"),
        "modules_to_save": raw.get("modules_to_save"),
        "task_type": raw.get("task_type"),
        "base_model": raw.get("base_model_name_or_path"),
        "adapter_bits": bits,
        "weights_file": weights.name,
        "metadata": metadata,
        "adapted_modules": len(modules),
        "tensors": len(header),
        "params": params,
        "lora_params": lora_params,
        "file_bytes": weights.stat().st_size,
        "dtypes": dtypes,
        "loadable": problem is None,
        "problem": problem,
    }


# ---------------------------------------------------------------------------------- checkpoints
def _read_quant_states(files: list[Path], keys: dict[str, Path]) -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in keys.items():
        by_file.setdefault(file, []).append(key)
    for file, file_keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in file_keys:
                try:
                    states[key] = json.loads(bytes(f.get_tensor(key).tolist()).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise FormatError(f"{file}: {key} is not valid JSON ({err})") from None
    return states


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    """Facts about a model folder: quantized layers (type, block size, bits per parameter) and
    dense tensors."""
    files = model_weight_files(folder)
    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, Path] = {}
    for file in files:
        file_header, _ = read_safetensors_header(file)
        header.update(file_header)
        where.update(dict.fromkeys(file_header, file))
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    state_keys = {k: where[k] for k in header if _QSTATE.fullmatch(k)}
    states = _read_quant_states(files, state_keys)
    layers, claimed = [], set()
    for key, meta in sorted(states.items()):
        match = _QSTATE.fullmatch(key)
        module = match[1]
        layer_keys = [
            k for k in header if k == f"{module}.weight" or k.startswith(f"{module}.weight.")
        ]
        claimed.update(layer_keys)
        shape = meta.get("shape", [])
        numel = math.prod(shape) if isinstance(shape, list) else 0
        nbytes = sum(_nbytes(*header[k]) for k in layer_keys)
        # Codes and block scales only: the code books and the JSON are per-layer constants.
        core = [k for k in layer_keys if not k.endswith("quant_map") and ".quant_state." not in k]
        core_bytes = sum(_nbytes(*header[k]) for k in core)
        layers.append(
            {
                "name": module,
                "quant_type": meta.get("quant_type"),
                "blocksize": meta.get("blocksize"),
                "double_quant": "nested_offset" in meta,
                "dtype": meta.get("dtype"),
                "shape": shape,
                "params": numel,
                "bytes": nbytes,
                "bits_per_param": 8 * core_bytes / numel if numel else None,
                "file_bits_per_param": 8 * nbytes / numel if numel else None,
            }
        )
    dense = {k: v for k, v in header.items() if k not in claimed}
    q_params = sum(layer["params"] for layer in layers)
    q_bytes = sum(layer["bytes"] for layer in layers)
    dense_params = sum(math.prod(s) for _, s in dense.values())
    dense_bytes = sum(_nbytes(d, s) for d, s in dense.values())
    dtypes: dict[str, int] = {}
    for d, s in dense.values():
        dtypes[d] = dtypes.get(d, 0) + math.prod(s)
    return {
        "kind": "quantized" if layers else "model",
        "path": str(folder),
        "files": [f.name for f in files],
        "file_bytes": sum(f.stat().st_size for f in files),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "quantization_config": config.get("quantization_config"),
        "quantized_layers": layers,
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "quantized_bits_per_param": 8 * q_bytes / q_params if q_params else None,
        "dense_tensors": len(dense),
        "dense_params": dense_params,
        "dense_bytes": dense_bytes,
        "dense_dtypes": dtypes,
        "total_params": q_params + dense_params,
        "bits_per_param": 8 * (q_bytes + dense_bytes) / (q_params + dense_params)
        if q_params + dense_params
        else None,
    }


# ---------------------------------------------------------------------------------- entry points
def inspect_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe an adapter folder (one or several adapters), a model checkpoint folder, or a
    GGUF file (``kind`` ``"gguf"``, see :func:`~loraq.io.gguf_inspect.inspect_gguf`).

    Returns a JSON-friendly dict with ``kind`` = ``"adapter"`` (with ``adapters``: one entry per
    adapter: rank, alpha, targets, parameter count, bytes, ...), ``"quantized"`` (a 4-/8-bit
    checkpoint: each quantized layer's type, block size and bits per parameter, plus the dense
    rest) or ``"model"`` (a dense checkpoint).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FormatError: nothing readable there (pickle files are refused with a conversion hint).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if root.is_file():
        if root.name == CONFIG_NAME:
            root = root.parent
        elif root.suffix.lower() == ".gguf":
            return inspect_gguf(root)
        elif root.suffix == ".safetensors":
            header, metadata = read_safetensors_header(root)
            return {
                "kind": "safetensors",
                "path": str(root),
                "tensors": len(header),
                "params": sum(math.prod(s) for _, s in header.values()),
                "file_bytes": root.stat().st_size,
                "metadata": metadata,
            }
        else:
            if root.suffix in PICKLE_SUFFIXES:
                refuse_pickle(root)
            raise FormatError(f"{root}: loraq inspects folders, .safetensors and .gguf files")
    adapters = _adapter_folders(root)
    if adapters:
        infos = [inspect_adapter(folder, name) for name, folder in adapters]
        return {
            "kind": "adapter",
            "path": str(root),
            "adapters": infos,
            "params": sum(i["params"] for i in infos),
            "file_bytes": sum(i["file_bytes"] for i in infos),
        }
    return inspect_checkpoint(root)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`inspect_path`'s result."""
    lines = []
    if info["kind"] == "gguf":
        return format_gguf_inspection(info)
    if info["kind"] == "adapter":
        lines.append(f"{info['path']}: {len(info['adapters'])} LoRA adapter(s)")
        for a in info["adapters"]:
            targets = a["target_modules"]
            if isinstance(targets, list) and len(targets) > 6:
                targets = targets[:6] + [f"... ({len(a['target_modules'])} in all)"]
            math_line = f"    rank {a['r']}, alpha {a['lora_alpha']}"
            if a["scaling"] is not None:
                math_line += f", scaling {a['scaling']:.4g}"
            if a["use_rslora"]:
                math_line += " (rsLoRA)"
            if a["use_dora"]:
                math_line += ", DoRA"
            if a["adapter_bits"]:
                math_line += f", stored as {a['adapter_bits']}-bit codes"
            lines += [
                f"  [{a['name']}] {a['path']}",
                math_line,
                f"    targets: {targets}",
                f"    modules_to_save: {a['modules_to_save']}",
                f"    task: {a['task_type']}, base model: {a['base_model']}",
                f"    {a['adapted_modules']} adapted modules, {a['params']:,} params "
                f"({a['lora_params']:,} in LoRA matrices), {a['tensors']} tensors, "
                f"{_size(a['file_bytes'])} in {a['weights_file']}",
            ]
            if not a["loadable"]:
                lines.append(f"    cannot be loaded by loraq: {a['problem']}")
        return "\n".join(lines)
    if info["kind"] == "safetensors":
        return (
            f"{info['path']}: {info['tensors']} tensors, {info['params']:,} params, "
            f"{_size(info['file_bytes'])}"
        )
    arch = ", ".join(info["architectures"] or []) or info["model_type"] or "unknown architecture"
    lines.append(f"{info['path']}: {arch}, files {info['files']} ({_size(info['file_bytes'])})")
    if info["quantized_layers"]:
        kinds: dict[tuple, int] = {}
        for layer in info["quantized_layers"]:
            key = (layer["quant_type"], layer["blocksize"], layer["double_quant"])
            kinds[key] = kinds.get(key, 0) + 1
        for (qt, bs, dq), count in sorted(kinds.items(), key=str):
            lines.append(
                f"  {count} quantized layers: {qt}, blocksize {bs}"
                + (", double quantization" if dq else "")
            )
        lines.append(
            f"  quantized: {info['quantized_params']:,} params in {_size(info['quantized_bytes'])}"
            f" on disk = {info['quantized_bits_per_param']:.3f} bits/param (incl. code books)"
        )
        width = max(len(layer["name"]) for layer in info["quantized_layers"])
        for layer in info["quantized_layers"]:
            lines.append(
                f"    {layer['name']:<{width}}  {layer['quant_type']:<7} {str(layer['shape']):<14}"
                f" {layer['bits_per_param']:.3f} bits/param (codes + scales)"
            )
    lines.append(
        f"  dense: {info['dense_tensors']} tensors, {info['dense_params']:,} params in "
        f"{_size(info['dense_bytes'])} {info['dense_dtypes']}"
    )
    if info["bits_per_param"] is not None:
        lines.append(
            f"  overall: {info['total_params']:,} params, {info['bits_per_param']:.3f} bits/param"
        )
    if info["quantization_config"]:
        lines.append(
            f"  quantization_config: {json.dumps(info['quantization_config'], sort_keys=True)}"
        )
    return "\n".join(lines)
