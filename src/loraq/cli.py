"""The ``loraq`` command line: a thin layer over the library.

    loraq train [CONFIG.yaml] [--key value ...]     fine-tune (no CONFIG: the built-in default)
    loraq eval --adapter DIR --data FILE             loss/perplexity or accuracy on a file
    loraq eval --adapter DIR --tasks T1,T2           lm-evaluation-harness tasks, in process
    loraq eval --adapter DIR --perplexity FILE       sliding-window perplexity of a text
    loraq generate --adapter DIR "prompt"            greedy or sampled continuation
    loraq merge --adapter DIR --out DIR              adapter + base -> dense HF model folder
    loraq combine --adapter a=DIR --adapter b=DIR --weights 0.7,0.3 --out DIR
                                                     adapters -> one weighted adapter (TIES, ...)
    loraq export --format gguf --adapter DIR --out F adapter (or --merged model) as llama.cpp GGUF
    loraq inspect PATH [--json]                      what an adapter / checkpoint / .gguf holds
    loraq compare [CONFIG.yaml] [--methods ...]      full vs LoRA vs QLoRA: memory, speed, quality
    loraq serve --base DIR [--adapter NAME=DIR ...]  many adapters behind an OpenAI-compatible API

Each subcommand is one entry of :data:`SUBCOMMANDS` (help text, an ``add_arguments`` function
and a ``run`` function returning the exit code); add a command with :func:`register`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Light at import (dataclasses and yaml): torch loads only when a command runs.
from loraq.compare import command as compare_command
from loraq.core.dtypes import FLOAT_DTYPE_NAMES
from loraq.core.errors import EXIT_ERROR, EXIT_INTERRUPTED, CliError, user_message
from loraq.core.precision import CPU_BF16_ENV
from loraq.core.switches import read_switch
from loraq.eval import command as eval_command
from loraq.io import export_command
from loraq.native.build import MODE_ENV as KERNELS_ENV
from loraq.train import combine_command
from loraq.train.config import describe_keys
from loraq.train.hub import hub_offline

EXIT_OK = 0
#: Shows the full traceback of every error (also ``LORAQ_DEBUG=1``); accepted anywhere.
DEBUG_FLAG = "--debug"


@dataclass
class Subcommand:
    """One ``loraq <name>`` command.

    Attributes:
        help: one line for ``loraq --help``.
        add_arguments: adds the command's options to its argparse parser.
        run: does the work; returns the process exit code.
        passthrough: extra ``--key value`` words are collected in ``args.overrides`` instead of
            being argparse errors (``train`` uses this for config overrides).
        description: longer text for ``loraq <name> --help`` (defaults to ``help``).
        needs_hub: run without :func:`hub_offline` (``eval``: lm-eval's hub tasks download
            their data sets; the command goes offline only when the user asks).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passthrough: bool = False
    description: str = ""
    needs_hub: bool = False


#: All subcommands by name. Planned: ``quantize`` (added by :func:`register` from its own
#: module, or as an entry here).
SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, command: Subcommand) -> None:
    """Add (or replace) the subcommand ``loraq <name>``."""
    SUBCOMMANDS[name] = command


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with the default the code uses.

    The default is read from the option itself (``(default: %(default)s)``), so help and code
    cannot disagree. Options without a default worth showing (None, False, an empty list) and
    helps that already say where their default comes from (``default: the adapter's``) are left
    as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``loraq <command>: error: ...`` (exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


# ----------------------------------------------------------------------------- shared helpers
DENSE_BASE_HELP = (
    "load a QLoRA adapter over the float base weights instead of the quantized base it was "
    "trained with"
)


def _load_for_inference(args: argparse.Namespace, task: str | None):
    """(model, tokenizer, run config or None) for eval/generate/merge."""
    from loraq.train.inference import load_trained

    return load_trained(
        model_path=args.model, adapter=args.adapter, task=task, dense_base=args.dense_base
    )


# ----------------------------------------------------------------------------- train
TRAIN_HELP = """\
Fine-tune a local Hugging Face model with LoRA or QLoRA.

  loraq train                          the built-in default: QLoRA (NF4, double quant) on
                                       all-MiniLM-L6-v2, sentiment classification, ~1 min on CPU
  loraq train my.yaml                  a config file (sections: model, data, lora, training)
  loraq train my.yaml --lora.r 16 --lr 1e-3 --training.max_steps 200
  loraq train my.yaml --resume         continue from the newest checkpoint in output_dir
  loraq train my.yaml --overwrite      start afresh, deleting output_dir's old checkpoints
                                       (without it, a run refuses to start over them)
  loraq train my.yaml --nproc 2        2 ranks on this machine (DDP; torchrun's launcher)
  torchrun --nproc_per_node 8 -m loraq train my.yaml --training.distributed fsdp
                                       8 ranks, FSDP2: base and adapters sharded

Overrides: --section.key VALUE or --key VALUE when the key name is unique (--r, --lr, --epochs),
also --key=VALUE. Values are YAML (16, 1e-3, true, null, [q_proj,v_proj]); a flag without a value
means true. Unknown keys are errors that suggest the nearest valid key. Without CONFIG the
overrides apply to the built-in default (examples/default.yaml).

Writes to training.output_dir: adapter/ (PEFT layout), config.yaml (resolved), metrics.jsonl,
loss.png and checkpoints/step-N/ (every training.save_every steps and on Ctrl-C). Ctrl-C once:
checkpoint and stop (exit code 130); twice: abort. Under torchrun training.batch_size is per
rank, rank 0 alone writes, SIGINT/SIGTERM on any rank (or on `--nproc`'s launcher) stops all ranks
after one checkpoint (exit code 130), and a checkpoint resumes only on as many ranks as wrote it.

Keys, with the values used when a config file leaves them out:
"""


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (default: the built-in one)")


def _pop_int_option(words: list[str], flag: str) -> tuple[int | None, list[str]]:
    """``--flag N`` or ``--flag=N`` taken out of ``words``: (N or None, the other words)."""
    rest, value = [], None
    it = iter(words)
    for word in it:
        if word == flag or word.startswith(flag + "="):
            text = word.partition("=")[2] if "=" in word else next(it, "")
            if not text.isdigit() or int(text) < 1:
                raise CliError(f"{flag} needs a positive number of processes, got {text!r}")
            value = int(text)
        else:
            rest.append(word)
    return value, rest


def _train(args: argparse.Namespace) -> int:
    from loraq.train.config import load_config
    from loraq.train.loop import train

    nproc, overrides = _pop_int_option(args.overrides, "--nproc")
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from loraq.train.distributed import Dist, launch
        from loraq.train.distributed_checkpoint import refuse_other_world_size

        # config errors and a checkpoint of another world size: reported once, before any rank
        # starts
        cfg = load_config(args.config, overrides)
        checkpoints = Path(cfg.training.output_dir) / "checkpoints"
        refuse_other_world_size(cfg.training, checkpoints, Dist(world_size=nproc))
        failed = launch(nproc, ([args.config] if args.config else []) + overrides)
        if not failed:
            return EXIT_OK
        if set(failed) != {EXIT_INTERRUPTED}:
            return EXIT_ERROR
        _say_interrupted(checkpoints)
        return EXIT_INTERRUPTED
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _say_interrupted(checkpoints: Path) -> None:
    """The launcher's one line after its ranks stopped on a signal."""
    from loraq.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(checkpoints)
    where = f"; newest checkpoint {newest} (continue with --resume)" if newest else ""
    print(f"loraq train: interrupted{where}", file=sys.stderr)


# ----------------------------------------------------------------------------- eval
def _eval(args: argparse.Namespace) -> int:
    from loraq.train.config import from_flat
    from loraq.train.data import infer_labels, pad_id_of, read_records, tokenize_records
    from loraq.train.evaluation import evaluate, format_metrics
    from loraq.train.inference import load_with_adapters

    if eval_command.mode(args) != "data":
        return eval_command.run(args, load_with_adapters)
    if len(args.adapter) > 1:
        raise CliError("--data scores one adapter; compare several with --tasks or --perplexity")
    args.adapter = args.adapter[0] if args.adapter else None
    if not args.adapter and not args.model:
        raise CliError("loraq eval needs --adapter DIR or --model PATH")
    model, tokenizer, run = _load_for_inference(args, args.task)
    task = args.task or (run.model.task if run else "causal-lm")
    flat = {"model.path": args.model or (run.model.path if run else ""), "model.task": task}
    if run is not None:
        flat.update({f"data.{k}": v for k, v in vars(run.data).items()})
    flat["data.train"] = args.data
    flat["data.eval"] = args.data
    for key, value in (
        ("data.text_column", args.text_column),
        ("data.label_column", args.label_column),
        ("data.max_length", args.max_length),
    ):
        if value is not None:
            flat[key] = value
    if args.labels:
        flat["data.labels"] = [s.strip() for s in args.labels.split(",")]
    flat["data.packing"] = False
    cfg = from_flat(flat)
    records = read_records(args.data, cfg.data.format)
    labels = None
    if task == "seq-cls":
        labels = cfg.data.labels or infer_labels(records, cfg.data.label_column, args.data)
        id2label = getattr(model.config, "id2label", None) or {}
        if len(id2label) and len(id2label) != len(labels):
            raise CliError(
                f"the model has {len(id2label)} labels but {args.data} has {len(labels)}: "
                "pass --labels"
            )
    examples = tokenize_records(records, cfg, tokenizer, labels, args.data)
    scores = evaluate(model, examples, task, args.batch_size, pad_id_of(tokenizer))
    if not scores:
        raise CliError(f"{args.data}: no labelled tokens to score ({len(examples)} examples)")
    if args.json:
        print(json.dumps({"examples": len(examples), **scores}))
    else:
        print(f"{args.data}: {len(examples)} examples  {format_metrics(scores)}")
    return EXIT_OK


# ----------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--adapter", help="adapter folder (e.g. runs/x/adapter)")
    p.add_argument("--model", help="base model folder or pkg:NAME (default: the adapter's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens"
    )
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dense-base", action="store_true", help=DENSE_BASE_HELP)


def _generate(args: argparse.Namespace) -> int:
    from loraq.generation.decode import generate

    if not args.adapter and not args.model:
        raise CliError("loraq generate needs --adapter DIR or --model PATH")
    model, tokenizer, run = _load_for_inference(args, "causal-lm")
    (text,) = generate(
        model,
        tokenizer,
        [args.prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(text)
    return EXIT_OK


# ----------------------------------------------------------------------------- merge
def _merge_args(p: argparse.ArgumentParser) -> None:
    from loraq.model.merging import MERGE_TARGETS

    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--model", help="base model folder or pkg:NAME (default: the adapter's)")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], help="default: the adapter's")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument(
        "--dtype", default="float32", choices=list(FLOAT_DTYPE_NAMES), help="saved weights' dtype"
    )
    p.add_argument("--dense-base", action="store_true", help=DENSE_BASE_HELP)
    p.add_argument(
        "--into",
        default="dequantized",
        choices=list(MERGE_TARGETS),
        help="merge a QLoRA adapter into the dequantized base it trained on (exact), the "
        "original float weights (as PEFT; lossy) or the same 4-/8-bit format (smallest)",
    )
    p.add_argument(
        "--original",
        help="float model (folder or pkg:NAME) for --into original; default: the base's",
    )


def _merge(args: argparse.Namespace) -> int:
    from loraq.io.merged_export import export_merged
    from loraq.io.safe import read_json
    from loraq.model.merging import REPORT_FILE, MergeReport
    from loraq.train.hub import quiet_transformers
    from loraq.train.inference import calibration_inputs, original_weights

    if args.original and args.into != "original":
        raise CliError("--original is only used with --into original")
    model, tokenizer, run = _load_for_inference(args, args.task)
    original = original_weights(args.original, model) if args.into == "original" else None
    batch = calibration_inputs(run, tokenizer, model)
    with quiet_transformers():
        export_merged(
            model,
            args.out,
            args.dtype,
            merge_into=args.into,
            original=original,
            calibration=batch,
            tokenizer=tokenizer,
        )
    report = Path(args.out) / REPORT_FILE
    line = f": {MergeReport(**read_json(report)).format()}" if report.is_file() else ""
    print(f"merged model written to {args.out}{line}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from loraq.train.inference import load_for_export

    return export_command.run(args, load_for_export)


# ----------------------------------------------------------------------------- inspect
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", help="adapter folder, model/4-bit checkpoint folder, .safetensors or .gguf"
    )
    p.add_argument("--json", action="store_true", help="print the facts as JSON")


def _inspect(args: argparse.Namespace) -> int:
    from loraq.io.inspect import format_inspection, inspect_path
    from loraq.io.safe import FormatError

    try:
        info = inspect_path(args.path)
    except FormatError as err:
        raise CliError(str(err)) from None
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return EXIT_OK


register(
    "train",
    Subcommand(
        "fine-tune with LoRA/QLoRA from a config",
        _train_args,
        _train,
        passthrough=True,
        description=TRAIN_HELP + describe_keys(),
    ),
)
register(
    "eval",
    Subcommand(
        "lm-eval tasks, perplexity, or loss/accuracy on a data file",
        eval_command.add_arguments,
        _eval,
        description=eval_command.EVAL_HELP,
        needs_hub=True,
    ),
)
register("generate", Subcommand("continue a prompt with a causal LM", _generate_args, _generate))
register(
    "merge", Subcommand("fold an adapter into its base; save a dense model", _merge_args, _merge)
)
register(
    "export",
    Subcommand(
        "write an adapter or merged model as GGUF for llama.cpp",
        export_command.add_arguments,
        _export,
        description=export_command.EXPORT_HELP,
    ),
)
register(
    "combine",
    Subcommand(
        "combine adapters into one (linear, cat, svd, ties, dare)",
        combine_command.add_arguments,
        combine_command.run,
        description=combine_command.COMBINE_HELP,
    ),
)
register(
    "inspect",
    Subcommand(
        "what an adapter, a (4-bit) checkpoint folder or a GGUF file holds",
        _inspect_args,
        _inspect,
    ),
)

register(
    "compare",
    Subcommand(
        "full fine-tuning vs LoRA vs QLoRA: params, memory, speed, quality",
        compare_command.add_arguments,
        compare_command.run,
        passthrough=True,
        description=compare_command.COMPARE_HELP,
    ),
)


# ----------------------------------------------------------------------------- serve
def _serve_args(p: argparse.ArgumentParser) -> None:
    from loraq.serve.command import add_arguments

    add_arguments(p)


def _serve(args: argparse.Namespace) -> int:
    from loraq.serve.command import run

    return run(args)


def _serve_help() -> str:
    from loraq.serve.command import SERVE_HELP

    return SERVE_HELP


register(
    "serve",
    Subcommand(
        help="serve a base and many adapters over an OpenAI-compatible HTTP API",
        add_arguments=_serve_args,
        run=_serve,
        description=_serve_help(),
    ),
)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per :data:`SUBCOMMANDS` entry."""
    parser = OneLineParser(
        prog="loraq",
        description="LoRA and QLoRA fine-tuning in pure PyTorch.",
        epilog=f"{DEBUG_FLAG} (anywhere on the line) shows the full traceback of an error.",
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=DefaultsHelpFormatter,
        )
        command.add_arguments(p)
    return parser


def _split_passthrough(words: list[str]) -> tuple[list[str], list[str]]:
    """Split ``[CONFIG] --key value ...`` into argparse words and override words."""
    head, rest = [], list(words)
    if rest and not rest[0].startswith("-"):
        head.append(rest.pop(0))
    head += [w for w in rest if w in ("-h", "--help")]
    return head, [w for w in rest if w not in ("-h", "--help")]


def main(argv: list[str] | None = None) -> int:
    """Run ``loraq`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("LORAQ_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    parser = build_parser()
    overrides: list[str] = []
    if argv and argv[0] in SUBCOMMANDS and SUBCOMMANDS[argv[0]].passthrough:
        head, overrides = _split_passthrough(argv[1:])
        argv = [argv[0], *head]
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help or a usage error: argparse already printed
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    if unknown:  # reported by the command's name, as its other usage errors are
        prog = f"loraq {args.command}"
        print(
            f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')",
            file=sys.stderr,
        )
        return EXIT_ERROR
    args.overrides = overrides
    try:
        for switch in (KERNELS_ENV, CPU_BF16_ENV):  # refused up front, not when first read
            read_switch(switch)
        command = SUBCOMMANDS[args.command]
        # loraq reads local folders only; restored when the command ends
        with contextlib.nullcontext() if command.needs_hub else hub_offline():
            return command.run(args)
    except KeyboardInterrupt:
        print(f"loraq {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = None if debug else user_message(err)
        if message is None:
            raise  # a bug in loraq (or --debug): keep the traceback
        print(f"loraq {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
