"""Reading OpenAI request bodies: every bad field is a 400 that names it.

==================  =========================================================================
function            checks
==================  =========================================================================
``json_body``       the body parses as JSON and is an object
``field``           one field has the expected JSON type (booleans are not numbers)
``sampling``        max_tokens against the cap and the context; temperature, top_p, top_k,
                    seed, n
``stops``           ``stop``: a non-empty string or a list of up to 4
==================  =========================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .registry import ServeError


@dataclass
class ServeSettings:
    """What the HTTP layer needs to know besides the engine."""

    base_name: str = "base"
    api_key: str | None = None
    max_tokens_cap: int = 512
    context_length: int = 2048


async def json_body(request) -> dict:
    """The request's JSON object (a 400 for malformed JSON or a non-object)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ServeError(400, f"malformed JSON body: {err}") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the JSON body must be an object")
    return body


def field(body: dict, name: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    """``body[name]`` (``default`` when absent or null), a 400 unless it is one of ``kinds``."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ServeError(400, f"{name} must be {what}, got {json.dumps(value)[:60]}", name)
    return value


def sampling(body: dict, settings: ServeSettings, prompt_len: int, default_max: int):
    """``(max_tokens, temperature, top_p, top_k, seed)`` from the body, each checked."""
    max_tokens = field(body, "max_tokens", (int,), None, "an integer")
    max_tokens = field(body, "max_completion_tokens", (int,), max_tokens, "an integer")
    if max_tokens is None:
        max_tokens = max(1, min(default_max, settings.context_length - prompt_len))
    if max_tokens < 1 or max_tokens > settings.max_tokens_cap:
        raise ServeError(
            400,
            f"max_tokens must be in 1..{settings.max_tokens_cap}, got {max_tokens}",
            "max_tokens",
        )
    if prompt_len + max_tokens > settings.context_length:
        raise ServeError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"length {settings.context_length}",
            "prompt" if prompt_len >= settings.context_length else "max_tokens",
        )
    temperature = float(field(body, "temperature", (int, float), 1.0, "a number in [0, 2]"))
    if not 0 <= temperature <= 2:
        raise ServeError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = float(field(body, "top_p", (int, float), 1.0, "a number in (0, 1]"))
    if not 0 < top_p <= 1:
        raise ServeError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = field(body, "top_k", (int,), None, "an integer")
    if top_k is not None and top_k < 0:
        raise ServeError(400, f"top_k must be >= 0, got {top_k}", "top_k")
    seed = field(body, "seed", (int,), None, "an integer")
    if field(body, "n", (int,), 1, "an integer") != 1:
        raise ServeError(400, "only n=1 is supported", "n")
    return max_tokens, temperature, top_p, top_k, seed


def stops(body: dict) -> tuple[str, ...]:
    """The body's stop strings."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 4
    ):
        raise ServeError(400, "stop must be a non-empty string or a list of up to 4", "stop")
    return tuple(stop)
