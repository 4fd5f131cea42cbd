"""``loraq eval``: its options, and the run of ``--tasks`` (lm-eval) and ``--perplexity``.

    loraq eval --adapter DIR --data FILE                   loss/perplexity or accuracy on a file
    loraq eval --adapter DIR --tasks arc_easy,hellaswag    lm-eval tasks: base vs adapter
    loraq eval --model BASE --adapter a=DIR --adapter b=DIR --tasks T --include-path examples/eval
    loraq eval --adapter DIR --perplexity FILE --max-length 1024 --stride 512

The command line loads the model (it knows runs, bases and quantization) and hands it here with
:func:`run`'s ``load``; ``--data`` stays with the training code's evaluation. Light at import:
torch and lm-eval load when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

from ..core.errors import CliError
from .variants import BASE_COLUMN, Variant, variants

EVAL_HELP = """\
Score a model, with or without adapters.

  --data FILE          loss/perplexity (causal-lm) or accuracy (seq-cls) on your own file
  --tasks T1,T2        lm-evaluation-harness tasks (pip install 'loraq[eval]'), scored by
                       lm-eval's own HF model class on the loaded loraq model: one column for the
                       base and one per --adapter (quantized bases and merges included)
  --perplexity FILE    sliding-window perplexity of a text file (token, word and byte
                       perplexity, bits per byte: lm-eval's wikitext definitions)

Local tasks: --include-path DIR adds the task YAMLs in DIR, e.g. the shipped one:
  loraq eval --adapter runs/x/adapter --tasks loraq_tiny_mc --include-path examples/eval
Hub tasks (hellaswag, arc_easy, ...) download their data sets unless they are cached; loraq does
not switch the network off unless --offline asks it to.
"""

#: ``NAME=DIR``: a name is letters, digits, ``_``, ``-`` and ``.``.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Name of a single adapter given without one.
DEFAULT_ADAPTER_NAME = "adapter"
#: Modes of the command: exactly one is chosen.
MODES = ("data", "tasks", "perplexity")

#: ``load(model_path or None, {name: adapter folder}, dense_base) -> (model, tokenizer)``.
Loader = Callable[[str | None, dict[str, str], bool], "tuple[nn.Module, Any]"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """All of ``loraq eval``'s options."""
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder; repeat as NAME=DIR to compare several in one table",
    )
    p.add_argument("--model", help="base model folder, .gguf or pkg:NAME (default: the adapter's)")
    p.add_argument("--data", help="data file (.jsonl, .csv, .tsv, .txt) to score loss/accuracy on")
    p.add_argument("--tasks", help="lm-eval task names, comma separated")
    p.add_argument("--perplexity", metavar="FILE", help="text file to score perplexity on")
    p.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="folder of task YAMLs"
    )
    p.add_argument("--limit", type=float, help="items per task (a count, or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per item (task default)")
    p.add_argument(
        "--output", metavar="FILE", help="write the scores (and per-item samples) as JSON"
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="no Hugging Face Hub access: sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE for the run",
    )
    p.add_argument(
        "--merge", action="store_true", help="also score the adapter merged into its base"
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="--data: tokens per example (default: the run's); --perplexity: tokens per window "
        "(default: the model's context); --tasks: lm-eval's max_length",
    )
    p.add_argument("--stride", type=int, help="--perplexity: new tokens scored per window")
    p.add_argument(
        "--task", choices=["causal-lm", "seq-cls"], help="default: the adapter's, else causal-lm"
    )
    p.add_argument("--labels", help="seq-cls label names in class order, comma separated")
    p.add_argument("--text-column", help="seq-cls text column (default: the run's, or 'text')")
    p.add_argument("--label-column", help="seq-cls label column (default: the run's or 'label')")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument(
        "--dense-base",
        action="store_true",
        help="load a QLoRA adapter over the float base weights instead of the quantized base "
        "it was trained with",
    )


def mode(args: argparse.Namespace) -> str:
    """Which of :data:`MODES` the options ask for (exactly one must be given)."""
    chosen = [m for m in MODES if getattr(args, m)]
    if len(chosen) != 1:
        raise CliError(
            "loraq eval needs exactly one of --data FILE, --tasks T1,T2, --perplexity FILE"
        )
    for name in ("batch_size", "max_length", "stride", "num_fewshot"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_fewshot" else 1):
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.limit is not None and args.limit <= 0:
        raise CliError(f"--limit must be a positive integer, got {args.limit}")
    if args.stride is not None and chosen[0] != "perplexity":
        raise CliError("--stride applies to --perplexity only")
    return chosen[0]


def parse_adapters(values: list[str]) -> dict[str, str]:
    """``{name: folder}`` from ``--adapter`` values (``NAME=DIR`` or a lone ``DIR``)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not ADAPTER_NAME.match(name) or Path(value).exists():
            if len(values) > 1:
                raise CliError(f"--adapter {value}: name each of several adapters as NAME=DIR")
            name, folder = DEFAULT_ADAPTER_NAME, value
        if name == BASE_COLUMN or name in out:
            raise CliError(f"--adapter {value}: the name '{name}' is taken; choose another")
        out[name] = folder
    return out


def run(args: argparse.Namespace, load: Loader) -> int:
    """``loraq eval --tasks`` or ``--perplexity`` (see :data:`EVAL_HELP`); returns 0."""
    from .harness import require_lm_eval
    from .offline import offline
    from .report import format_table, write_json

    chosen = mode(args)
    adapters = parse_adapters(args.adapter)
    if not adapters and not args.model:
        raise CliError("loraq eval needs --adapter DIR or --model PATH")
    if args.merge and len(adapters) != 1:
        raise CliError("--merge needs exactly one --adapter")
    with offline() if args.offline else contextlib.nullcontext():
        if chosen == "tasks":
            require_lm_eval()  # before loading a model: the install hint comes first
        model, tokenizer = load(args.model, adapters, args.dense_base)
        columns = variants(list(adapters), merged=args.merge)
        if chosen == "tasks":
            scores = _tasks(args, model, tokenizer, columns)
        else:
            scores = _perplexity(args, model, tokenizer, columns)
    if args.output:
        write_json(args.output, scores)
    if args.json:
        print(json.dumps({name: s["results"] for name, s in scores.items()}, default=str))
    else:
        print(format_table(scores))
    return 0


def _tasks(args, model, tokenizer, columns: list[Variant]) -> dict[str, dict[str, Any]]:
    from .harness import score_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    return score_tasks(
        model,
        tokenizer,
        tasks,
        columns,
        include_path=args.include_path,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_length=args.max_length,
        log_samples=bool(args.output),
    )


def _perplexity(args, model, tokenizer, columns: list[Variant]) -> dict[str, dict[str, Any]]:
    from .harness import selected
    from .perplexity import perplexity

    path = Path(args.perplexity)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"--perplexity {path}: not UTF-8 text") from None
    if not text.strip():
        raise CliError(f"--perplexity {path}: the file is empty")
    max_length = args.max_length or int(getattr(model.config, "max_position_embeddings", 2048))
    if args.stride is not None and args.stride > max_length:
        raise CliError(f"--stride {args.stride} is larger than --max-length {max_length}")
    scores = {}
    for variant in columns:
        with selected(model, variant):
            result = perplexity(model, tokenizer, text, max_length, args.stride).as_dict()
        scores[variant.name] = {"results": {path.name: result}}
    return scores
