"""Log-probabilities in OpenAI's two reply shapes, from the decode loop's :class:`TokenLogprob`.

=========================================  ==================================================
request                                    ``logprobs`` of a choice
=========================================  ==================================================
``/v1/completions`` ``logprobs: k``         ``{"tokens", "token_logprobs", "top_logprobs",
(``echo: true``: the prompt's tokens        "text_offset"}``: parallel lists; ``top_logprobs``
first, the very first with ``null``)        maps token text -> logprob (k likeliest)
``/v1/chat/completions`` ``logprobs:        ``{"content": [{"token", "logprob", "bytes",
true``, ``top_logprobs: k``                 "top_logprobs": [{"token", "logprob", "bytes"}]}]}``
=========================================  ==================================================

The values are of the model's raw distribution (before temperature, top-k and top-p), in float32,
as :mod:`loraq.generation.decode` records them. A token's text is the tokenizer's decoding of that
token alone; ``text_offset`` is where it starts in the choice's text (the prompt's text first
when echoed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..generation.decode import TokenLogprob
from .fields import field
from .registry import ServeError


@dataclass(frozen=True)
class LogprobOptions:
    """What a request asks for: ``top`` alternatives per token (None: no logprobs at all) and,
    for ``/v1/completions``, ``echo`` (the prompt's text, and its tokens' logprobs if any)."""

    top: int | None = None
    echo: bool = False


def _bounded(value: int, name: str, limit: int) -> int:
    if not 0 <= value <= limit:
        raise ServeError(
            400, f"{name} must be in 0..{limit} (the server's --max-logprobs), got {value}", name
        )
    return value


def completion_options(body: dict, max_logprobs: int) -> LogprobOptions:
    """``logprobs`` (an integer: alternatives per token) and ``echo`` of a completions body."""
    top = field(body, "logprobs", (int,), None, "an integer")
    echo = field(body, "echo", (bool,), False, "a boolean")
    return LogprobOptions(None if top is None else _bounded(top, "logprobs", max_logprobs), echo)


def chat_options(body: dict, max_logprobs: int) -> LogprobOptions:
    """``logprobs`` (a boolean) and ``top_logprobs`` (alternatives) of a chat body."""
    wanted = field(body, "logprobs", (bool,), False, "a boolean")
    top = field(body, "top_logprobs", (int,), None, "an integer")
    if top is not None and not wanted:
        raise ServeError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if not wanted:
        return LogprobOptions()
    return LogprobOptions(_bounded(top or 0, "top_logprobs", max_logprobs))


def token_text(tokenizer: Any, token: int) -> str:
    """The text of one token on its own (a piece of a multi-byte character decodes to U+FFFD)."""
    return tokenizer.decode([token])


def completion_logprobs(
    tokenizer: Any,
    items: Sequence[TokenLogprob | None],
    tokens: Sequence[int],
    start_offset: int = 0,
) -> dict[str, list]:
    """The ``logprobs`` object of a ``/v1/completions`` choice: one entry per token of ``tokens``
    (``items[i]`` its logprob, None for an echoed first token), offsets from ``start_offset``."""
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    offset = start_offset
    for token, item in zip(tokens, items):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if item is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(item.logprob)
        top = item.top or ((item.token, item.logprob),)  # logprobs 0: the token itself
        out["top_logprobs"].append({token_text(tokenizer, t): lp for t, lp in top})
    return out


def _entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, items: Sequence[TokenLogprob]) -> dict[str, list]:
    """The ``logprobs`` object of a ``/v1/chat/completions`` choice."""
    content = []
    for item in items:
        entry = _entry(tokenizer, item.token, item.logprob)
        entry["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in item.top]
        content.append(entry)
    return {"content": content}


def _kept(tokenizer: Any, items: Sequence[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The items whose tokens made ``text`` (a stop string may have cut the tail off)."""

    def decoded(m: int) -> str:
        return tokenizer.decode([i.token for i in items[:m]], skip_special_tokens=True)

    if decoded(len(items)) == text:
        return list(items)
    m = len(items)
    while m > 0 and not text.startswith(decoded(m)):
        m -= 1
    return list(items[:m])


def choice_logprobs(
    tokenizer: Any,
    options: LogprobOptions,
    chat: bool,
    prompt_ids: Sequence[int],
    prompt_text: str,
    text: str,
    sequence: Any,
) -> tuple[str, dict | None]:
    """``(text, logprobs)`` of one choice: the prompt's text first when echoed, and the
    ``logprobs`` object asked for (None when none was) of the tokens behind that text."""
    shown = prompt_text + text if options.echo and not chat else text
    if options.top is None:
        return shown, None
    generated = _kept(tokenizer, sequence.logprobs, text)
    if chat:
        return shown, chat_logprobs(tokenizer, generated)
    items: list[TokenLogprob | None] = []
    tokens: list[int] = []
    if options.echo:
        items += sequence.prompt_logprobs
        tokens += list(prompt_ids)
    items += generated
    tokens += [item.token for item in generated]
    return shown, completion_logprobs(tokenizer, items, tokens)
