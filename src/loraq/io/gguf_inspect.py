"""``loraq inspect FILE.gguf``: what a GGUF model or adapter holds, and whether llama.cpp loads it.

Only the header is read (tensor data is never touched), through the bounds-checked layout of
:mod:`loraq.io.gguf_header`. The llama.cpp verdict lists the reasons llama.cpp would refuse the
file that the header shows: no tokenizer (``key not found in model: tokenizer.ggml.model``), a
BPE vocabulary without merges, a vocabulary whose size differs from the embedding's rows,
missing hyperparameters, an adapter whose LoRA pairs are incomplete.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from .gguf_names import ARCHITECTURES, gguf_to_hf_name
from .gguf_read import gguf_metadata, read_gguf

__all__ = ["format_gguf_inspection", "inspect_gguf"]

_LORA = re.compile(r"^(.+)\.weight\.lora_([ab])$")
_LAYER = re.compile(r"^blk\.\d+\.")
# Keys llama.cpp's model loader requires of every architecture.
_REQUIRED = ("block_count", "embedding_length", "attention.head_count")


def _types(layout: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in layout.tensors:
        entry = out.setdefault(t.type_name, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += math.prod(t.dims)
        entry["bytes"] += t.nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def _model_problems(meta: dict[str, Any], layout: Any, arch: str | None) -> list[str]:
    problems = []
    for key in _REQUIRED:
        if f"{arch}.{key}" not in meta:
            problems.append(f"metadata key '{arch}.{key}' is missing")
    types, lengths = layout.value_types, layout.array_lengths
    if "tokenizer.ggml.model" not in types:
        problems.append("no tokenizer (llama.cpp: key not found in model: tokenizer.ggml.model)")
        return problems
    if meta.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.merges" not in types:
        problems.append("a BPE ('gpt2') vocabulary without tokenizer.ggml.merges")
    embedding = next((t for t in layout.tensors if t.name == "token_embd.weight"), None)
    n_tokens = lengths.get("tokenizer.ggml.tokens", 0)
    if embedding is not None and len(embedding.dims) == 2 and embedding.dims[1] != n_tokens:
        problems.append(
            f"{n_tokens} tokens but token_embd.weight has {embedding.dims[1]} rows "
            "(llama.cpp checks them equal)"
        )
    return problems


def _adapter(meta: dict[str, Any], layout: Any, arch: str | None) -> tuple[dict, list[str]]:
    pairs: dict[str, dict[str, Any]] = {}
    for t in layout.tensors:
        match = _LORA.match(t.name)
        if match:
            pairs.setdefault(match[1], {})[match[2]] = t
    problems = []
    if meta.get("adapter.type") != "lora":
        problems.append(f"adapter.type is {meta.get('adapter.type')!r}, not 'lora'")
    if not isinstance(meta.get("adapter.lora.alpha"), (int, float)):
        problems.append("adapter.lora.alpha is missing")
    stray = [t.name for t in layout.tensors if not _LORA.match(t.name)]
    if stray:
        problems.append(f"{len(stray)} tensors are not LoRA factors (e.g. {stray[0]})")
    targets: dict[str, int] = {}
    ranks = set()
    for stem, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            problems.append(f"{stem} has lora_{next(iter(pair))} but not its partner")
            continue
        ranks.add(pair["b"].dims[0])  # lora_b is (out, r): GGUF dims (r, out)
        kind = _LAYER.sub("", stem)
        hf = gguf_to_hf_name(stem, arch) if arch in ARCHITECTURES else None
        name = f"{kind} ({hf.rsplit('.', 1)[-1]})" if hf and hf.rsplit(".", 1)[-1] != kind else kind
        targets[name] = targets.get(name, 0) + 1
    info = {
        "alpha": meta.get("adapter.lora.alpha"),
        "ranks": sorted(ranks),
        "targets": dict(sorted(targets.items())),
        "pairs": len(pairs),
    }
    return info, problems


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts about a GGUF file: architecture, tensor types (count, params, bytes), tokenizer,
    for an adapter its targets, rank and alpha, and ``llamacpp_loadable`` with the reasons
    (``llamacpp_problems``) when not.

    Raises FileNotFoundError, or FormatError naming the file if it is not valid GGUF.
    """
    layout, reader = read_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    kind = meta.get("general.type", "model")
    problems = [] if arch in ARCHITECTURES else [f"architecture {arch!r} is not one loraq knows"]
    info: dict[str, Any] = {
        "kind": "gguf",
        "path": str(path),
        "gguf_type": kind,
        "architecture": arch,
        "version": layout.version,
        "file_bytes": layout.file_size,
        "tensors": len(layout.tensors),
        "params": sum(math.prod(t.dims) for t in layout.tensors),
        "tensor_types": _types(layout),
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "tokens": layout.array_lengths.get("tokenizer.ggml.tokens", 0),
            "merges": layout.array_lengths.get("tokenizer.ggml.merges", 0),
            "chat_template": "tokenizer.chat_template" in layout.value_types,
        },
    }
    if kind == "adapter":
        info["adapter"], more = _adapter(meta, layout, arch)
        info.pop("tokenizer")
    else:
        more = _model_problems(meta, layout, arch)
    info["llamacpp_problems"] = problems + more
    info["llamacpp_loadable"] = not info["llamacpp_problems"]
    return info


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_gguf_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`inspect_gguf`'s result."""
    lines = [
        f"{info['path']}: GGUF v{info['version']} {info['gguf_type']}, architecture "
        f"{info['architecture']}, {info['tensors']} tensors, {info['params']:,} params, "
        f"{_size(info['file_bytes'])}"
    ]
    for name, t in info["tensor_types"].items():
        lines.append(
            f"  {name:<6} {t['tensors']:>5} tensors {t['params']:>14,} params {_size(t['bytes'])}"
        )
    if "adapter" in info:
        a = info["adapter"]
        lines.append(f"  LoRA: {a['pairs']} pairs, rank {a['ranks']}, alpha {a['alpha']}")
        lines.append("  targets: " + ", ".join(f"{k} x{v}" for k, v in a["targets"].items()))
    else:
        tok = info["tokenizer"]
        if tok["model"]:
            lines.append(
                f"  tokenizer: {tok['model']} (pre {tok['pre']}), {tok['tokens']:,} tokens, "
                f"{tok['merges']:,} merges, chat template: {'yes' if tok['chat_template'] else 'no'}"
            )
        else:
            lines.append("  tokenizer: none")
    if info["llamacpp_loadable"]:
        lines.append("  llama.cpp: loads (as far as the header shows)")
    else:
        lines.append("  llama.cpp: will NOT load it: " + "; ".join(info["llamacpp_problems"]))
    return "\n".join(lines)
