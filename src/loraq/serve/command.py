"""``loraq serve``: arguments, wiring (base, registry, engine, app) and uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SERVE_HELP = """\
Serve a base model and any number of LoRA adapters behind an OpenAI-compatible HTTP API.

  loraq serve --base models/llama --adapter support=out/support --adapter legal=out/legal
  loraq serve --base models/llama-nf4 --adapter-dir adapters/ --max-adapters 32 --api-key KEY
  loraq serve --base SmolLM2-135M-Instruct.Q4_1.gguf --adapter chat=out/chat

Requests pick an adapter with the `model` field (the base by --base-name); rows for different
adapters share each forward pass (continuous batching). Routes: POST /v1/completions,
POST /v1/chat/completions, GET /v1/models, POST /v1/adapters {"name","path"} (path relative to
--adapter-dir, safetensors only), DELETE /v1/adapters/NAME, GET /health, GET /metrics.
Binds 127.0.0.1 unless --host says otherwise. The API key may also come from LORAQ_API_KEY.
SIGTERM or Ctrl-C finishes in-flight requests, then exits.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq serve`` options."""
    from ..quant.formats import format_names

    p.add_argument(
        "--base", required=True, help="transformers folder, loraq 4-bit checkpoint or .gguf"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder to read the tokenizer from (default: the base's own; needed for a .gguf "
        "file without a vocabulary)",
    )
    p.add_argument("--base-name", default="base", help="model id of the bare base (default: base)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder to serve as model NAME (repeatable)",
    )
    p.add_argument("--adapter-dir", help="folder of adapter folders; run-time loads come from here")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--max-adapters", type=int, default=64, help="adapters resident at once (LRU)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted")
    p.add_argument(
        "--quant",
        choices=list(format_names(quantize=True)),
        default=None,
        help="quantize a dense base's Linear layers at load time",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _adapter_pairs(values: list[str]) -> list[tuple[str, Path]]:
    from ..core.errors import CliError

    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--adapter expects NAME=PATH, got {value!r}")
        if not Path(path).is_dir():
            raise CliError(f"--adapter {name}: {path} is not a folder")
        pairs.append((name, Path(path)))
    return pairs


def build_app(args: argparse.Namespace):
    """The FastAPI app for parsed ``loraq serve`` arguments (the model loaded, adapters registered)."""
    from ..core.errors import CliError
    from .app import ServeSettings, create_app
    from .engine import Engine
    from .loading import BaseLoadError, context_length, load_base
    from .registry import AdapterRegistry, ServeError

    pairs = _adapter_pairs(args.adapter)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise CliError(f"--adapter-dir {args.adapter_dir} is not a folder")
    try:
        model, tokenizer = load_base(args.base, args.quant, args.tokenizer)
    except BaseLoadError as err:
        raise CliError(str(err)) from None
    registry = AdapterRegistry(
        model,
        base_name=args.base_name,
        adapter_dir=None if args.adapter_dir is None else Path(args.adapter_dir),
        max_resident=args.max_adapters,
    )
    try:
        for name, path in pairs:
            registry.add(name, path)
        for message in registry.add_from_dir()[1]:
            print(f"loraq serve: skipped an adapter folder: {message}", file=sys.stderr)
        for name, _ in pairs[: args.max_adapters]:  # load the named ones now: fail fast
            registry.acquire(name)
            registry.release(name)
    except (ServeError, ValueError) as err:
        raise CliError(getattr(err, "message", str(err))) from None
    engine = Engine(registry, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue)
    settings = ServeSettings(
        base_name=args.base_name,
        api_key=args.api_key or os.environ.get("LORAQ_API_KEY") or None,
        max_tokens_cap=args.max_tokens_cap,
        context_length=context_length(model),
    )
    return create_app(engine, settings)


def run(args: argparse.Namespace) -> int:
    """``loraq serve``: load everything, then serve until SIGTERM / Ctrl-C (drained)."""
    try:
        import uvicorn
    except ImportError:
        from ..core.errors import CliError

        raise CliError(
            "loraq serve needs fastapi and uvicorn: pip install 'loraq[serve]'"
        ) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = build_app(args)
    print(f"loraq serve: listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None
    )
    return 0
