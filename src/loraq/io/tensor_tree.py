"""Nested Python state with tensors in it (an optimizer's ``state_dict``, RNG states) as a JSON
file for the structure and a safetensors file for the tensors: no pickle either way.

    tree = {"state": {0: {"step": tensor(3.), "exp_avg": tensor([...])}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "params": [0]}]}
    save_tree(tree, "opt.json", "opt.safetensors")
    load_tree("opt.json", "opt.safetensors") == tree      # same types, bit-equal tensors

JSON holds what JSON can say exactly (``str``, ``int``, ``bool``, ``None``, finite ``float``
via its shortest repr, lists and string-keyed dicts); the rest is tagged:

=====================================  ===============================================
``{"__tensor__": "state/0/exp_avg"}``  a tensor, by its key in the safetensors file
``{"__tuple__": [...]}``               a tuple
``{"__items__": [[key, value], ...]}`` a dict with a non-string key (or a key that is a tag)
``{"__float__": "nan"}``               a non-finite float (``nan``, ``inf``, ``-inf``)
=====================================  ===============================================
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from loraq.io.safe import (
    FormatError,
    atomic_save_safetensors,
    atomic_write_text,
    read_json,
    read_safetensors,
)

_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


def encode_tree(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``tree`` as JSON-ready values; its tensors go into ``tensors`` under their path."""
    if isinstance(tree, torch.Tensor):
        key = path or "."
        if key in tensors:  # two paths that read the same ("a/b" and "a" -> "b")
            key = f"{key}#{len(tensors)}"
        tensors[key] = tree
        return {"__tensor__": key}
    if isinstance(tree, bool) or tree is None or isinstance(tree, (int, str)):
        return tree
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else {"__float__": repr(tree)}
    if isinstance(tree, (list, tuple)):
        items = [encode_tree(v, tensors, _join(path, i)) for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    if isinstance(tree, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in tree):
            return {k: encode_tree(v, tensors, _join(path, k)) for k, v in tree.items()}
        return {
            "__items__": [
                [
                    encode_tree(k, tensors, _join(path, f"key{i}")),
                    encode_tree(v, tensors, _join(path, k)),
                ]
                for i, (k, v) in enumerate(tree.items())
            ]
        }
    raise TypeError(f"cannot store {type(tree).__name__} at '{path or '.'}' (no pickle)")


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def decode_tree(data: Any, tensors: dict[str, torch.Tensor], source: str = "tree") -> Any:
    """Inverse of :func:`encode_tree`; a tensor key missing from ``tensors`` names ``source``."""
    if isinstance(data, list):
        return [decode_tree(v, tensors, source) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        key = data["__tensor__"]
        if key not in tensors:
            raise FormatError(f"{source}: tensor '{key}' is missing")
        return tensors[key]
    if "__tuple__" in data:
        return tuple(decode_tree(v, tensors, source) for v in data["__tuple__"])
    if "__float__" in data:
        return float(data["__float__"])
    if "__items__" in data:
        return {
            decode_tree(k, tensors, source): decode_tree(v, tensors, source)
            for k, v in data["__items__"]
        }
    return {k: decode_tree(v, tensors, source) for k, v in data.items()}


def save_tree(
    tree: Any, json_path: str | os.PathLike[str], tensors_path: str | os.PathLike[str]
) -> None:
    """Write ``tree``'s structure to ``json_path`` and its tensors to ``tensors_path``
    (each file atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    data = encode_tree(tree, tensors)
    atomic_save_safetensors(tensors_path, tensors)
    # Not sorted: the file keeps the tree's own key order.
    atomic_write_text(json_path, json.dumps({"tree": data}, indent=1) + "\n")


def load_tree(json_path: str | os.PathLike[str], tensors_path: str | os.PathLike[str]) -> Any:
    """Read back what :func:`save_tree` wrote; errors name the file."""
    data = read_json(json_path)
    if "tree" not in data:
        raise FormatError(f"{json_path} has no 'tree' entry")
    tensors, _ = read_safetensors(Path(tensors_path))
    return decode_tree(data["tree"], tensors, source=str(tensors_path))
