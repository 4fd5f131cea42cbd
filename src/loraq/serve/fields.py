"""Reading OpenAI request bodies: every bad field is a 400 that names it.

======================  =====================================================================
function                checks
======================  =====================================================================
``json_body``           at most ``max_body_bytes`` (a 413), parses as JSON, is an object
``field``               one field has the expected JSON type (booleans are not numbers)
``sampling``            max_tokens against the cap and the context; temperature, top_p,
                        top_k, seed (finite, in range)
``choice_count``        ``n``: 1..MAX_N choices per prompt, at most MAX_CHOICES in all
``choice_seeds``        each choice's seed: the request's for the first, derived for the rest
``stops``               ``stop``: a string or a list of up to 4, each 1..MAX_STOP_CHARS long
``check_prompt_chars``  a prompt's length in characters, before it is tokenized
``check_text``          text the tokenizer can take (no unpaired UTF-16 surrogate)
``combination``         ``model`` as a weighted sum of adapters (``"a*0.7+b*0.3"``), or None
======================  =====================================================================

Nothing a client sends reaches the tokenizer or the engine unchecked: a bad value is a 400 here,
never a 500 (or a failed batch) later.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import NAME_PATTERN, ServeError, short_repr

#: Default of ``--max-body-bytes``: room for a long context's prompt written as escaped JSON.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: Longest stop string: the engine checks each one against the text's end at every token.
MAX_STOP_CHARS = 256
#: Most adapters one ``model`` combination may name (each is a resident adapter's worth of work).
MAX_COMBINATION_TERMS = 4
#: A combination's weight: a plain decimal number, optionally negative (no ``+``: it joins terms).
_WEIGHT = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?$")
#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)
#: The most choices (``n``) a request may ask for per prompt.
MAX_N = 16
#: The most choices one request may produce in all (prompts x ``n``; each is a row of the batch).
MAX_CHOICES = 64


@dataclass
class ServeSettings:
    """What the HTTP layer needs to know besides the engine."""

    base_name: str = "base"
    api_key: str | None = None
    max_tokens_cap: int = 512
    context_length: int = 2048
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: ``--max-logprobs``: the most alternatives per token a request may ask for.
    max_logprobs: int = 20


def _too_large(limit: int) -> ServeError:
    return ServeError(413, f"the request body is larger than --max-body-bytes ({limit} bytes)")


async def json_body(request, limit: int = DEFAULT_MAX_BODY_BYTES) -> dict:
    """The request's JSON object: a 413 past ``limit`` bytes (read no further), a 400 for
    malformed JSON, invalid UTF-8 or a non-object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no length: count it
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:  # on a worker thread: parsing megabytes would hold up /health and the streams
        body = await asyncio.to_thread(json.loads, b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
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


def _number(body: dict, name: str, default: float, ok: Callable[[float], bool], what: str) -> float:
    """A finite number field accepted by ``ok`` (NaN and Infinity, which Python's JSON reader
    accepts, are refused)."""
    value = field(body, name, (int, float), default, what)
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not (math.isfinite(value) and ok(value)):
        raise ServeError(400, f"{name} must be {what}, got {value}", name)
    return value


def sampling(
    body: dict, settings: ServeSettings, prompt_len: int, default_max: int, least: int = 1
):
    """``(max_tokens, temperature, top_p, top_k, seed)`` from the body, each checked;
    ``least`` is the smallest max_tokens allowed (0 when a prompt is only scored: ``echo``)."""
    given = body.get("max_completion_tokens") is not None
    name = "max_completion_tokens" if given else "max_tokens"  # errors name the field sent
    max_tokens = field(body, name, (int,), None, "an integer")
    if max_tokens is None:
        max_tokens = max(1, min(default_max, settings.context_length - prompt_len))
    if max_tokens < least or max_tokens > settings.max_tokens_cap:
        raise ServeError(
            400, f"{name} must be in {least}..{settings.max_tokens_cap}, got {max_tokens}", name
        )
    if prompt_len + max_tokens > settings.context_length:
        raise ServeError(
            400,
            f"prompt ({prompt_len} tokens) + {name} ({max_tokens}) exceeds the context "
            f"length {settings.context_length}",
            "prompt" if prompt_len >= settings.context_length else name,
        )
    temperature = _number(body, "temperature", 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = field(body, "top_k", (int,), None, "an integer")
    if top_k is not None and top_k < 0:
        raise ServeError(400, f"top_k must be >= 0, got {top_k}", "top_k")
    seed = field(body, "seed", (int,), None, "an integer")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ServeError(
            400, f"seed must be in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}", "seed"
        )
    return max_tokens, temperature, top_p, top_k, seed


def choice_count(body: dict, prompts: int) -> int:
    """``n``: independent choices per prompt, 1..:data:`MAX_N`, and prompts x n at most
    :data:`MAX_CHOICES`."""
    n = field(body, "n", (int,), 1, "an integer")
    if not 1 <= n <= MAX_N:
        raise ServeError(400, f"n must be in 1..{MAX_N}, got {n}", "n")
    if prompts * n > MAX_CHOICES:
        raise ServeError(
            400, f"n={n} for {prompts} prompts is {prompts * n} choices; at most {MAX_CHOICES}", "n"
        )
    return n


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seed of each of ``n`` choices: ``seed`` itself for the first (so a choice does not
    depend on ``n``), and for the others seeds derived from ``seed`` and the choice's index
    (independent draws, the same on every request with that seed). No seed: None for each."""
    if seed is None:
        return [None] * n
    derived = [
        int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
        for i in range(1, n)
    ]
    return [seed, *derived]


def stops(body: dict) -> tuple[str, ...]:
    """The body's stop strings."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise ServeError(
            400,
            f"stop must be a string or a list of up to 4, each of 1..{MAX_STOP_CHARS} characters",
            "stop",
        )
    return tuple(stop)


def prompt_char_limit(tokenizer, context_length: int) -> int:
    """The most characters a prompt that fits ``context_length`` tokens can have.

    No token covers more characters than its vocabulary string has (byte-level vocabularies
    spell one byte per character, and a character is at least one byte), so a longer prompt
    cannot fit and is refused before the tokenizer spends time and memory on it.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return context_length * max(1, longest)


def check_prompt_chars(chars: int, limit: int, field_name: str, context_length: int) -> None:
    """A 400 naming ``field_name`` when a prompt of ``chars`` characters cannot fit the context."""
    if chars > limit:
        raise ServeError(
            400,
            f"{field_name} is {chars} characters; at most {limit} fit the context length "
            f"{context_length}",
            field_name,
        )


def check_text(text: str, field_name: str, label: str | None = None) -> None:
    """A 400 naming ``field_name`` (``label`` in the message) for text that is not Unicode the
    tokenizer can take: JSON's ``"\\ud800"`` escape decodes to an unpaired surrogate, which
    has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ServeError(
            400,
            f"{label or field_name} holds an unpaired UTF-16 surrogate "
            f"({ascii(text[err.start])}) at character {err.start}",
            field_name,
        ) from None


def combination(model: str) -> tuple[tuple[str, float], ...] | None:
    """``model`` read as a combination of adapters, ``"a*0.7+b*0.3"``: ``(name, weight)`` pairs
    sorted by name (a term without ``*weight`` weighs 1), or None when ``model`` names one model
    (adapter names hold neither ``*`` nor ``+``). A 400 naming ``model`` for bad syntax, a
    weight that is not a finite number, a repeated adapter or more than
    :data:`MAX_COMBINATION_TERMS` terms. Whether the adapters exist is the registry's to say.
    """
    if "*" not in model and "+" not in model:
        return None
    terms = model.split("+")
    if len(terms) > MAX_COMBINATION_TERMS:
        raise ServeError(
            400,
            f"model {short_repr(model)} combines {len(terms)} adapters; at most "
            f"{MAX_COMBINATION_TERMS} may be combined",
            "model",
        )
    pairs: dict[str, float] = {}
    for term in terms:
        name, star, weight = term.strip().partition("*")
        name, weight = name.strip(), weight.strip()
        if not NAME_PATTERN.match(name) or (star and not _WEIGHT.match(weight)):
            raise ServeError(
                400,
                f"model {short_repr(model)}: term {short_repr(term)} is not ADAPTER*WEIGHT "
                '(e.g. "a*0.7+b*0.3")',
                "model",
            )
        value = float(weight) if star else 1.0
        if not math.isfinite(value):
            raise ServeError(
                400, f"model {short_repr(model)}: weight {weight} is not finite", "model"
            )
        if name in pairs:
            raise ServeError(
                400, f"model {short_repr(model)} names adapter {name!r} twice", "model"
            )
        pairs[name] = value
    return tuple(sorted(pairs.items()))
