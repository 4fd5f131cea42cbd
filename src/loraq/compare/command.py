"""``loraq compare``: its help, its options and the command itself (``loraq.cli`` registers it).

compare passes unknown ``--key value`` words through as config overrides (as ``loraq train``
does), so it takes its own options out of the words itself (:func:`split_compare_options`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from loraq.train.config import load_config, parse_overrides

from .methods import (
    DEFAULT_METHODS,
    DEFAULT_OUT,
    DEFAULT_STEPS,
    FULL_LR_FACTOR,
    METHODS,
    CompareError,
    default_methods,
    parse_methods,
    parse_ranks,
    reserved_override,
)

COMPARE_HELP = f"""\
Fine-tune the same model on the same data once per method and measure each: trainable params,
weight bytes (frozen base and trained part), saved file size, peak memory, step time, tokens/s,
and the eval metric before and after. Each run is its own process (so peaks do not mix).

  loraq compare                               the built-in default (MiniLM sentiment), ~3 min
  loraq compare my.yaml --methods lora,qlora --ranks 4,8,16 --steps 50
  loraq compare --methods full,qlora --lr 1e-3 --full-lr 5e-5

Same model, data, seed, batches and eval for every run; `full` uses --full-lr (default
{FULL_LR_FACTOR:g} x lr: adapters want about 10x the learning rate of full fine-tuning).

A dpo or orpo config (training.method, or --training.method dpo|orpo) trains every adapter
method by that objective and reports the held-out pairs' reward accuracy and margin.

Methods (--methods, comma-separated; default: all, less full for dpo / orpo):
{chr(10).join(f"  {m.name:<10}{m.help}" for m in METHODS.values())}

Any other --key value is an override of the train config (as for `loraq train`). Writes
OUT/compare.md, OUT/compare.json (every number and the environment), OUT/compare.png, and each
run's folder OUT/runs/<method>-r<rank>/ (adapter, metrics.jsonl, worker.log).
"""

#: compare's own options (everything else on the command line is a config override).
_COMPARE_OPTIONS = ("--methods", "--ranks", "--steps", "--out", "--full-lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq compare`` options, for ``--help``."""
    # :func:`run` reads them itself (with
    # split_compare_options), since the command passes unknown ``--key value`` words through as
    # config overrides.
    p.add_argument("config", nargs="?", help="YAML config file (default: the built-in one)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated, or 'all'; a dpo / orpo config leaves full out",
    )
    p.add_argument("--ranks", help="adapter ranks to sweep, e.g. 4,8,16 (default: the config's r)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run (default: --training.max_steps if given, else {DEFAULT_STEPS})",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    p.add_argument(
        "--full-lr",
        type=float,
        default=None,
        help=f"learning rate for 'full' (default: {FULL_LR_FACTOR:g} x the config's lr)",
    )


def split_compare_options(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take compare's own ``--option value`` (or ``--option=value``) out of ``words``; return
    them and the remaining words (config overrides)."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        name_ = name.replace("_", "-")
        if name_ in _COMPARE_OPTIONS:
            if not eq:
                if i + 1 >= len(words) or words[i + 1].startswith("--"):
                    raise CompareError(f"{name_} needs a value")
                value = words[i + 1]
                i += 1
            own[name_.lstrip("-").replace("-", "_")] = value
        else:
            rest.append(word)
        i += 1
    return own, rest


def run(args: argparse.Namespace) -> int:
    """``loraq compare``: parse, compare, print the table; exit code 0, or 2 if a run failed."""
    from .runner import compare

    own, words = split_compare_options(list(getattr(args, "overrides", []) or []))
    config = args.config
    if (
        config is None
        and words
        and not words[0].startswith("--")
        and words[0].endswith((".yaml", ".yml"))
    ):
        config = words.pop(0)  # `loraq compare --methods lora my.yaml`
    overrides = parse_overrides(words)
    for key, value in overrides.items():
        why = reserved_override(key, value)
        if why:
            raise CompareError(f"--{key} is set by loraq compare: {why}")
    ranks = parse_ranks(own["ranks"]) if "ranks" in own else None
    steps: Any = own.get("steps", overrides.get("training.max_steps") or DEFAULT_STEPS)
    if isinstance(steps, str):
        if not re.fullmatch(r"\+?\d+", steps.strip()) or int(steps) <= 0:
            raise CompareError(f"--steps must be a positive integer, got {steps!r}")
        steps = int(steps)
    full_lr = None
    if "full_lr" in own:
        try:
            full_lr = float(own["full_lr"])
        except ValueError:
            full_lr = float("nan")
        if not 0 < full_lr < float("inf"):
            raise CompareError(
                f"--full-lr must be a number, finite and > 0, got {own['full_lr']!r}"
            )
    cfg = load_config(config, overrides)
    methods = parse_methods(own.get("methods", ",".join(default_methods(cfg))))
    command = "loraq compare " + " ".join(
        [*([str(args.config)] if args.config else []), *(getattr(args, "overrides", []) or [])]
    )
    report = compare(
        cfg,
        methods,
        ranks,
        steps,
        own.get("out", DEFAULT_OUT),
        full_lr=full_lr,
        settings={"command": command.strip()},
    )
    out = Path(own.get("out", DEFAULT_OUT))
    print(report.table())
    print(
        f"\n{len(report.runs)} runs in {report.wall_s:.0f} s; wrote {out / 'compare.md'}, "
        f"{out / 'compare.json'}, {out / 'compare.png'}"
    )
    return 0 if all(r.ok for r in report.runs) else 2
