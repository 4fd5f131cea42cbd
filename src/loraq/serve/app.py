"""The HTTP app: OpenAI-compatible routes over the engine, adapter management, auth, health.

======================================  ===================================================
route                                   answer
======================================  ===================================================
``POST /v1/completions``                OpenAI text completion (``stream``: SSE chunks)
``POST /v1/chat/completions``           OpenAI chat completion (the tokenizer's template)
``GET /v1/models``                      the base and the adapters (``parent``: the base)
``POST /v1/adapters``                   ``{"name", "path"}``: load from under --adapter-dir
``DELETE /v1/adapters/{name}``          unload; waits for its requests (``force=false``: 409)
``GET /health``                         ``{"status": "ok"}`` while the engine runs (no auth)
``GET /metrics``                        Prometheus text
======================================  ===================================================

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; a bad field is a
400 naming it, an unknown model 404, a full queue 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..generation import SamplingParams
from .engine import Engine
from .engine import Request as EngineRequest
from .registry import ServeError

_UNLOAD_WAIT_S = 60.0


@dataclass
class ServeSettings:
    """What the HTTP layer needs to know besides the engine."""

    base_name: str = "base"
    api_key: str | None = None
    max_tokens_cap: int = 512
    context_length: int = 2048


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param), err.status, err.headers)


# ---------------------------------------------------------------------------------- fields
def _get(body: dict, name: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ServeError(400, f"{name} must be {what}, got {json.dumps(value)[:60]}", name)
    return value


def _sampling(body: dict, settings: ServeSettings, prompt_len: int, default_max: int):
    max_tokens = _get(body, "max_tokens", (int,), None, "an integer")
    max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens, "an integer")
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
    temperature = float(_get(body, "temperature", (int, float), 1.0, "a number in [0, 2]"))
    if not 0 <= temperature <= 2:
        raise ServeError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number in (0, 1]"))
    if not 0 < top_p <= 1:
        raise ServeError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = _get(body, "top_k", (int,), None, "an integer")
    if top_k is not None and top_k < 0:
        raise ServeError(400, f"top_k must be >= 0, got {top_k}", "top_k")
    seed = _get(body, "seed", (int,), None, "an integer")
    if _get(body, "n", (int,), 1, "an integer") != 1:
        raise ServeError(400, "only n=1 is supported", "n")
    return max_tokens, temperature, top_p, top_k, seed


def _stops(body: dict) -> tuple[str, ...]:
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


# ---------------------------------------------------------------------------------- app
def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and drained by the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="loraq serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    registry = engine.registry

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, err: ServeError):
        engine.metrics.requests.inc(outcome="rejected")
        return _error_response(err)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip(), settings.api_key
            ):
                return JSONResponse(
                    error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                    401,
                    {"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            raise ServeError(400, f"malformed JSON body: {err}") from None
        if not isinstance(body, dict):
            raise ServeError(400, "the JSON body must be an object")
        return body

    def model_of(body: dict) -> str | None:
        name = body.get("model")
        if not isinstance(name, str):
            raise ServeError(400, "model must be a string naming the base or an adapter", "model")
        if name == settings.base_name:
            return None
        if not registry.is_known(name):
            raise ServeError(404, f"model {name!r} does not exist; see GET /v1/models", "model")
        return name

    def encode(text: str, field: str, special: bool = True) -> list[int]:
        ids = engine.tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) >= settings.context_length:
            raise ServeError(
                400,
                f"{field} is {len(ids)} tokens; the context length is {settings.context_length}",
                field,
            )
        return list(ids)

    async def run(request: Request, body: dict, prompt_ids: list[int], chat: bool) -> Response:
        adapter = model_of(body)
        max_tokens, temperature, top_p, top_k, seed = _sampling(
            body, settings, len(prompt_ids), settings.max_tokens_cap if chat else 16
        )
        eos = engine.tokenizer.eos_token_id
        params = SamplingParams(
            max_tokens, temperature, top_k or None, top_p, seed, () if eos is None else (eos,)
        )
        stream = _get(body, "stream", (bool,), False, "a boolean")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        req = EngineRequest(
            prompt_ids,
            adapter,
            params,
            lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            _stops(body),
        )
        engine.submit(req)
        reply = _Reply(body["model"], chat)
        if stream:
            return StreamingResponse(
                _stream(req, events, reply, request), media_type="text/event-stream"
            )
        try:
            return await _collect(req, events, reply)
        finally:
            req.cancel()  # no-op when finished; frees the row if the client went away

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ServeError(400, "prompt must be a string (or a list of one string)", "prompt")
        return await run(request, body, encode(prompt, "prompt"), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(400, "messages must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ServeError(400, f"messages[{i}] needs a string 'role'", "messages")
            if not isinstance(m.get("content"), str):
                raise ServeError(400, f"messages[{i}].content must be a string", "messages")
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ServeError(
                400,
                "the base model's tokenizer has no chat template; use /v1/completions",
                "messages",
            )
        text = engine.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return await run(request, body, encode(text, "messages", special=False), chat=True)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [_model_card(settings.base_name, created)]
        data += [_model_card(n, created, settings.base_name) for n in registry.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = await json_body(request)
        name = await asyncio.to_thread(registry.add_runtime, body.get("name"), body.get("path"))
        return JSONResponse(_model_card(name, int(time.time()), settings.base_name), 201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, force: bool = True):
        registry.begin_unload(name)
        deadline = time.monotonic() + _UNLOAD_WAIT_S
        while registry.in_use(name) > 0:
            if not force or time.monotonic() > deadline:
                registry.cancel_unload(name)
                raise ServeError(409, f"adapter {name!r} has requests in flight", "name")
            await asyncio.sleep(0.02)
        await asyncio.to_thread(registry.finish_unload, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _model_card(name: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": created, "owned_by": "loraq"}
    if parent is not None:
        card["parent"] = parent
    return card


# ---------------------------------------------------------------------------------- replies
class _Reply:
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
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = done["finish_reason"]
        usage = {
            "prompt_tokens": done["prompt_tokens"],
            "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
        }
        return {**self._base(self.object), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False):
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("text_completion"), "choices": [choice]}


async def _collect(req: EngineRequest, events: asyncio.Queue, reply: _Reply) -> JSONResponse:
    parts: list[str] = []
    while True:
        ev = await events.get()
        if ev["type"] == "text":
            parts.append(ev["text"])
        elif ev["type"] == "error":
            return JSONResponse(error_body(ev["status"], ev["message"]), ev["status"])
        else:
            return JSONResponse(reply.full("".join(parts), ev))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(
    req: EngineRequest, events: asyncio.Queue, reply: _Reply, request: Request
) -> AsyncIterator[str]:
    first = True
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
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
