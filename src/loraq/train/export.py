"""``loraq export``: an adapter folder (or the model merged with it) as a GGUF file llama.cpp runs.

The base is the adapter's (its run config, else ``adapter_config.json``'s
``base_model_name_or_path``) unless ``--base`` names a model folder or a ``.gguf`` file. A GGUF
base is read with :func:`loraq.load_gguf` (no tokenizer needed: the merged file copies the
base's tokenizer metadata); a folder base is loaded as ``loraq merge`` loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from loraq.core.errors import CliError

EXPORT_HELP = """\
Write an adapter (or the model merged with it) as a GGUF file llama.cpp runs.

  loraq export --format gguf --adapter runs/x/adapter --out adapter.gguf
      llama-cli -m base.gguf --lora adapter.gguf   (the base the adapter was trained on)
  loraq export --format gguf --adapter runs/x/adapter --merged --dtype q8_0 --out model.gguf

The base comes from the adapter's run config / adapter_config.json unless --base names a model
folder or a .gguf file. --dtype for --merged: a dense type, a GGUF block format, or keep (unadapted
tensors of a GGUF base keep their exact blocks; the default for a GGUF base, f16 otherwise);
for an adapter: f32 (default) or f16.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq export`` options."""
    from loraq.io.gguf_write import MERGED_DTYPES

    p.add_argument("--format", required=True, choices=["gguf"], help="output format")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--base", help="base model folder or .gguf (default: the adapter's)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--merged", action="store_true", help="fold the adapter in; write the model")
    p.add_argument("--dtype", choices=list(MERGED_DTYPES), help="tensor type (see above)")


def load_for_export(adapter: str | Path, base: str | None = None) -> nn.Module:
    """The adapter over its base (``base`` or the one the adapter names), ready to export."""
    from loraq.io.gguf_read import gguf_model_file, load_gguf
    from loraq.train.inference import attach_adapter, load_trained, named_base
    from loraq.train.outputs import read_run_config

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CliError(f"'{adapter}' holds no adapter_config.json: not an adapter folder")
    run = read_run_config(adapter)
    base = base or named_base(adapter, run)
    if not base:
        raise CliError(f"'{adapter}' does not name its base model; pass --base")
    gguf_file = gguf_model_file(base)
    if gguf_file is None:
        model, _, _ = load_trained(model_path=base, adapter=adapter, task="causal-lm")
        return model
    model, _ = load_gguf(gguf_file, tokenizer=False)
    return attach_adapter(model, adapter, run)


def run(args: argparse.Namespace) -> int:
    """Run ``loraq export``; returns the exit code."""
    from loraq.io.gguf_write import ADAPTER_DTYPES, export_gguf

    if args.dtype is not None and not args.merged and args.dtype not in ADAPTER_DTYPES:
        raise CliError(
            f"--dtype {args.dtype} needs --merged (adapter tensors are {' or '.join(ADAPTER_DTYPES)})"
        )
    model = load_for_export(args.adapter, args.base)
    path = export_gguf(model, args.out, merged=args.merged, dtype=args.dtype)
    kind = "merged model" if args.merged else "adapter"
    print(f"{kind} GGUF written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
