"""``loraq export``: an adapter folder (or the model merged with it) as a GGUF file llama.cpp runs.

This module holds the command's help, options and writing; ``loraq.cli`` registers it and
passes the loader (:func:`loraq.train.inference.load_for_export`: the adapter over its base,
which is the adapter's run's or its ``adapter_config.json``'s unless ``--base`` names a model
folder or a ``.gguf`` file), so the file layer never imports the training layer.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from torch import nn

from ..core.errors import CliError
from .gguf_write import ADAPTER_DTYPES, MERGED_DTYPES, export_gguf

#: ``(adapter folder, --base or None) -> the adapted model`` (see the module docstring).
Loader = Callable[[str, "str | None"], nn.Module]

EXPORT_HELP = """\
Write an adapter (or the model merged with it) as a GGUF file llama.cpp runs.

  loraq export --format gguf --adapter runs/x/adapter --out adapter.gguf
      llama-cli -m base.gguf --lora adapter.gguf   (the base the adapter was trained on)
  loraq export --format gguf --adapter runs/x/adapter --merged --dtype q8_0 --out model.gguf

The base comes from the adapter's run config / adapter_config.json unless --base names a model
folder or a .gguf file. --dtype for --merged: f32, f16, bf16; a block format (q8_0, q6_k,
q4_k, q4_0, ...: every matrix in it); llama.cpp's mixed recipes q4_k_m, q4_k_s, q5_k_m, q5_k_s
(the per-tensor types llama-quantize picks); or keep (unadapted tensors of a GGUF base keep
their exact blocks; the default for a GGUF base, f16 otherwise); for an adapter: f32 (default)
or f16.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq export`` options."""
    p.add_argument("--format", required=True, choices=["gguf"], help="output format")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--base", help="base model folder or .gguf (default: the adapter's)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--merged", action="store_true", help="fold the adapter in; write the model")
    p.add_argument("--dtype", choices=list(MERGED_DTYPES), help="tensor type (see above)")


def run(args: argparse.Namespace, load: Loader) -> int:
    """Run ``loraq export`` with ``load`` finding and loading the model; returns the exit code."""
    if args.dtype is not None and not args.merged and args.dtype not in ADAPTER_DTYPES:
        raise CliError(
            f"--dtype {args.dtype} needs --merged (adapter tensors are {' or '.join(ADAPTER_DTYPES)})"
        )
    model = load(args.adapter, args.base)
    path = export_gguf(model, args.out, merged=args.merged, dtype=args.dtype)
    kind = "merged model" if args.merged else "adapter"
    print(f"{kind} GGUF written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
