"""OpenAI response bodies for the HTTP app: errors, completions, and server-sent event streams."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .engine import Request as EngineRequest

#: Seconds between checks that a streaming client is still connected (while tokens flow, and
#: while none come).
DISCONNECT_CHECK_S = 0.5


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def model_card(name: str, created: int, parent: str | None = None) -> dict[str, Any]:
    """An entry of ``GET /v1/models`` (adapters name the base as ``parent``)."""
    card = {"id": name, "object": "model", "created": created, "owned_by": "loraq"}
    if parent is not None:
        card["parent"] = parent
    return card


class Reply:
    """OpenAI response and chunk bodies for one request."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, done: dict) -> dict[str, Any]:
        """The non-streaming response for ``text`` and the engine's ``done`` event."""
        return self.full_choices([(text, done, None)])

    def full_choices(
        self, results: list[tuple[str, dict, dict | None]], per_prompt: int = 1
    ) -> dict[str, Any]:
        """The non-streaming response with one choice per ``(text, done event, logprobs)``
        (several prompts of one completions request, ``per_prompt`` choices each: ``n``);
        usage is summed over them, each prompt's tokens counted once, as OpenAI counts them."""
        choices = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, (text, done, logprobs) in enumerate(results):
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
                choice["logprobs"] = logprobs
            else:
                choice = {"index": index, "text": text, "logprobs": logprobs}
            choice["finish_reason"] = done["finish_reason"]
            choices.append(choice)
            if index % per_prompt == 0:
                usage["prompt_tokens"] += done["prompt_tokens"]
            usage["completion_tokens"] += done["completion_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**self._base(self.object), "choices": choices, "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False):
        """One streaming chunk (the first chat chunk carries the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}


async def outcome(events: asyncio.Queue) -> tuple[str, dict]:
    """The whole text of one request and its last event (``done`` or ``error``)."""
    parts: list[str] = []
    while True:
        ev = await events.get()
        if ev["type"] == "text":
            parts.append(ev["text"])
        else:
            return "".join(parts), ev


async def collect(req: EngineRequest, events: asyncio.Queue, reply: Reply) -> JSONResponse:
    """The whole completion as one JSON response once the engine is done."""
    text, ev = await outcome(events)
    if ev["type"] == "error":
        return JSONResponse(error_body(ev["status"], ev["message"]), ev["status"])
    return JSONResponse(reply.full(text, ev))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream(
    req: EngineRequest, events: asyncio.Queue, reply: Reply, request: Request
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client gone frees the request's row."""
    first = True
    checked = time.monotonic()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                ev = None
            # asked between events too: writes to a client that hung up do not fail, so a
            # fast stream would otherwise run to its last token for nobody
            if ev is None or time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            if ev["type"] == "error":
                yield _sse(error_body(ev["status"], ev["message"]))
                return
            if ev["type"] == "text":
                yield _sse(reply.chunk(ev["text"], first=first))
                first = False
                continue
            yield _sse(reply.chunk(None if reply.chat else "", ev["finish_reason"], first=first))
            yield _sse("[DONE]")
            return
    finally:
        req.cancel()
