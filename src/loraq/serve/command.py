"""``loraq serve``: arguments, wiring (base, registry, engine, app) and uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from ..core.threads import on_passing_thread
from ..generation.prefix_cache import DEFAULT_MAX_BYTES
from .fields import DEFAULT_MAX_BODY_BYTES, ServeSettings

SERVE_HELP = """\
Serve a base model and any number of LoRA adapters behind an OpenAI-compatible HTTP API.

  loraq serve --base models/llama --adapter support=out/support --adapter legal=out/legal
  loraq serve --base models/llama-nf4 --adapter-dir adapters/ --max-adapters 32 --api-key KEY
  loraq serve --base SmolLM2-135M-Instruct.Q4_1.gguf --adapter chat=out/chat

Requests pick an adapter with the `model` field (the base by --base-name); rows for different
adapters share each forward pass (continuous batching). Routes: POST /v1/completions,
POST /v1/chat/completions, GET /v1/models, POST /v1/adapters {"name","path"} (path relative to
--adapter-dir, safetensors only), DELETE /v1/adapters/NAME, GET /health, GET /metrics.
Binds 127.0.0.1 unless --host says otherwise (--port 0: any free port, printed at start). The
API key may also come from LORAQ_API_KEY. Request bodies over --max-body-bytes get a 413.
SIGTERM or Ctrl-C finishes in-flight requests, then exits; a second Ctrl-C exits at once (130).
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
    p.add_argument("--base-name", default="base", help="model id of the bare base")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder to serve as model NAME (repeatable)",
    )
    p.add_argument("--adapter-dir", help="folder of adapter folders; run-time loads come from here")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--max-adapters", type=int, default=64, help="adapters resident at once (LRU)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        help="memory for recent prompts' keys and values, reused by prompts that begin the "
        "same way (0: off)",
    )
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted")
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=ServeSettings.max_logprobs,
        help="most alternatives per token a request may ask for (logprobs, top_logprobs)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body; larger ones get a 413",
    )
    p.add_argument(
        "--quant",
        choices=list(format_names(quantize=True)),
        default=None,
        help="quantize a dense base's Linear layers at load time",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or a one-line :class:`CliError`.

    Bound before the model loads, so a port in use or a bad host fails in a second, not after
    the load, and as one line rather than uvicorn's log and exit code 3.
    """
    from ..core.errors import CliError

    if not 0 <= port <= 65535:
        raise CliError(f"--port must be in 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as err:
        raise CliError(f"--host {host!r} is not an address of this machine ({err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


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
    if args.max_body_bytes < 1:
        raise CliError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if args.max_logprobs < 0:
        raise CliError(f"--max-logprobs must be >= 0, got {args.max_logprobs}")
    if args.prefix_cache_mb < 0:
        raise CliError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
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
    engine = Engine(
        registry,
        tokenizer,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_bytes=args.prefix_cache_mb << 20,
    )
    settings = ServeSettings(
        base_name=args.base_name,
        api_key=args.api_key or os.environ.get("LORAQ_API_KEY") or None,
        max_tokens_cap=args.max_tokens_cap,
        max_logprobs=args.max_logprobs,
        context_length=context_length(model),
        max_body_bytes=args.max_body_bytes,
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
    sock = bind_listener(args.host, args.port)
    try:
        # loaded off the main thread: the engine thread stays the one OpenMP pool (core.threads)
        app = on_passing_thread(build_app, args, name="loraq-load")
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"loraq serve: listening on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None)
    _server_class(uvicorn)(config).run(sockets=[sock])
    return 0


def _server_class(uvicorn):
    """uvicorn's server, but a second Ctrl-C (while draining) exits at once with one line."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGINT and self.should_exit:
                from ..core.errors import EXIT_INTERRUPTED

                print(
                    "loraq serve: interrupted twice; exiting without finishing the open requests",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_INTERRUPTED)  # no draining, no cancelled streams' tracebacks
            super().handle_exit(sig, frame)

    return Server
