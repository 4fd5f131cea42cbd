"""``loraq combine``: adapter folders combined into one new adapter folder (PEFT layout).

The base is the one the adapters name (their run config, else ``adapter_config.json``) unless
``--base`` names a model folder or a ``.gguf`` file; adapters that name different bases are
refused. The adapters load over the float base (a combination reads only the adapters' own
tensors), :func:`loraq.combine` combines them, and :func:`loraq.save_adapter` writes the result.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from loraq.core.errors import CliError

if TYPE_CHECKING:  # torch loads when the command runs, not when the CLI starts
    from torch import nn

COMBINE_HELP = """\
Combine adapters into one new adapter (PEFT's add_weighted_adapter; see loraq.combine).

  loraq combine --adapter a=runs/a/adapter --adapter b=runs/b/adapter --weights 0.7,0.3 \\
      --method ties --density 0.5 --out runs/ab

Methods: cat (exact, rank = sum of ranks), linear, ties, dare_linear, dare_ties,
magnitude_prune (equal ranks; ties/dare/magnitude_prune need --density, the fraction kept),
svd and ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd (any ranks; rank
--svd-rank, default the largest). --seed makes the DARE methods' random masks reproducible.
The result is a normal adapter folder: load, eval, export or serve it like any other.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq combine`` options."""
    from loraq.model.combine import COMBINE_METHODS, DEFAULT_NAME
    from loraq.model.merge_rules import MAJORITY_SIGN_METHODS

    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an adapter folder and the name to combine it under (repeatable, in order)",
    )
    p.add_argument(
        "--weights", required=True, help="one weight per --adapter, comma separated (0.7,0.3)"
    )
    p.add_argument(
        "--method", default="linear", choices=list(COMBINE_METHODS), help="how to combine"
    )
    p.add_argument("--density", type=float, help="fraction of entries kept (ties, dare, ...)")
    p.add_argument(
        "--majority-sign",
        default="total",
        choices=list(MAJORITY_SIGN_METHODS),
        help="TIES sign election",
    )
    p.add_argument("--svd-rank", type=int, help="rank of an svd method's result")
    p.add_argument("--svd-clamp", type=float, help="clamp svd factors to this quantile")
    p.add_argument("--seed", type=int, default=0, help="torch seed (DARE's random masks)")
    p.add_argument("--name", default=DEFAULT_NAME, help="the combined adapter's name")
    p.add_argument("--base", help="base model folder or .gguf (default: the adapters')")
    p.add_argument("--out", required=True, help="folder for the combined adapter")


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``["a=DIR", ...]`` as ``{"a": Path(DIR)}``; one-line errors for a bad or repeated item."""
    from loraq.io.peft_format import CONFIG_NAME, is_adapter_folder

    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise CliError(f"--adapter expects NAME=DIR, got {value!r}")
        if name in adapters:
            raise CliError(f"--adapter {name} is given twice")
        if not is_adapter_folder(folder):
            raise CliError(f"--adapter {name}: '{folder}' holds no {CONFIG_NAME}")
        adapters[name] = Path(folder)
    return adapters


def parse_weights(text: str, names: list[str]) -> dict[str, float]:
    """``"0.7,0.3"`` as ``{name: weight}``, one finite number per adapter name."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(names):
        raise CliError(
            f"--weights has {len(parts)} value(s) for {len(names)} adapter(s) {names}: "
            "give one weight per --adapter"
        )
    weights = {}
    for name, part in zip(names, parts):
        try:
            weights[name] = float(part)
        except ValueError:
            weights[name] = math.nan
        if not math.isfinite(weights[name]):
            raise CliError(f"--weights: the weight of adapter {name!r} is not a number: {part!r}")
    return weights


def common_base(adapters: dict[str, Path], base: str | None) -> str:
    """``base``, else the one base every adapter names (a one-line error if they differ)."""
    from loraq.train.inference import adapter_base

    bases = {name: adapter_base(folder) for name, folder in adapters.items()}
    named = [(name, b) for name, b in bases.items() if b]
    for name, other in named[1:]:
        if other != named[0][1]:
            raise CliError(
                f"adapters {named[0][0]!r} and {name!r} were trained on different bases "
                f"({named[0][1]!r} and {other!r}); only adapters of one base can be combined"
            )
    base = base or (named[0][1] if named else None)
    if not base:
        raise CliError("the adapters do not name their base model; pass --base")
    return base


def load_adapters(adapters: dict[str, Path], base: str) -> nn.Module:
    """The base with every adapter loaded under its name, over float weights where possible."""
    from loraq.io.gguf_read import gguf_model_file, load_gguf
    from loraq.train.inference import attach_adapter, load_trained
    from loraq.train.outputs import read_run_config

    gguf_file = gguf_model_file(base)
    if gguf_file is None:
        model, _, _ = load_trained(model_path=base, task="causal-lm")
    else:
        model, _ = load_gguf(gguf_file, tokenizer=False)
    for name, folder in adapters.items():
        try:
            attach_adapter(
                model, folder, read_run_config(folder), dense_base=True, adapter_name=name
            )
        except ValueError as err:
            raise CliError(
                f"cannot load adapter {name!r} ('{folder}') onto {base}: {err}"
            ) from None
    return model


def run(args: argparse.Namespace) -> int:
    """Run ``loraq combine``; returns the exit code."""
    import torch

    from loraq.io.peft_format import save_adapter
    from loraq.model.combine import combine
    from loraq.model.surgery import config_of
    from loraq.train.modeling import quiet_transformers

    adapters = parse_adapters(args.adapter)
    weights = parse_weights(args.weights, list(adapters))
    base = common_base(adapters, args.base)
    with quiet_transformers():
        model = load_adapters(adapters, base)
    torch.manual_seed(args.seed)
    combine(
        model,
        weights,
        args.method,
        name=args.name,
        density=args.density,
        majority_sign=args.majority_sign,
        svd_rank=args.svd_rank,
        svd_clamp=args.svd_clamp,
    )
    save_adapter(model, args.out, adapter_name=args.name)
    rank = config_of(model, args.name).r
    terms = " + ".join(f"{w:g}*{n}" for n, w in weights.items())
    print(f"combined adapter ({args.method} of {terms}, rank {rank}) written to {args.out}")
    return 0
