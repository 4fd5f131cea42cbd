"""The HTTP app: OpenAI-compatible routes over the engine, adapter management, auth, health.

======================================  ===================================================
route                                   answer
======================================  ===================================================
``POST /v1/completions``                OpenAI text completion (``stream``: SSE chunks); a
                                        prompt string, token ids or a list of either;
                                        ``logprobs: k``, ``echo``, ``max_tokens: 0`` (scoring)
``POST /v1/chat/completions``           OpenAI chat completion (the tokenizer's template);
                                        ``logprobs: true``, ``top_logprobs: k``
``GET /v1/models``                      the base and the adapters (``parent``: the base)
``POST /v1/adapters``                   ``{"name", "path"}``: load from under --adapter-dir
``DELETE /v1/adapters/{name}``          unload; waits for its requests (``force=false``: 409)
``GET /health``                         ``{"status": "ok"}`` while the engine runs (no auth)
``GET /metrics``                        Prometheus text
======================================  ===================================================

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; a bad field is a
400 naming it (:mod:`.fields`), an unknown model 404, a body over ``--max-body-bytes`` 413, a
full queue 429 with ``Retry-After``. Response bodies and streams are built in :mod:`.replies`.
Prompts are measured in characters first and tokenized on a worker thread, so a long prompt
never holds up the event loop (``/health`` and the streams of other requests). A request's
``model`` may combine adapters, ``"a*0.7+b*0.3"``: computed once (``loraq.combine``, method
``cat``, exact) and cached (:mod:`.registry`); a bad combination is a 400 naming ``model``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..core.threads import on_passing_thread
from ..generation.decode import SamplingParams
from .engine import Engine
from .engine import Request as EngineRequest
from .fields import (
    MAX_CHOICES,
    ServeSettings,
    check_prompt_chars,
    check_text,
    choice_count,
    choice_seeds,
    combination,
    field,
    json_body,
    prompt_char_limit,
    sampling,
    stops,
)
from .logprobs import LogprobOptions, chat_options, choice_logprobs, completion_options
from .registry import ServeError, short_repr
from .replies import Reply, error_body, model_card, outcome, stream

__all__ = ["ServeSettings", "create_app", "error_body"]

_UNLOAD_WAIT_S = 60.0


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and drained by the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="loraq serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_errors_and_auth(app, engine, settings)
    _add_generation_routes(app, _Generator(engine, settings))
    _add_adapter_routes(app, engine, settings)
    _add_health_routes(app, engine)
    return app


def _add_errors_and_auth(app: FastAPI, engine: Engine, settings: ServeSettings) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, err: ServeError):
        engine.metrics.requests.inc(outcome="rejected")
        return JSONResponse(error_body(err.status, err.message, err.param), err.status, err.headers)

    key = settings.api_key.encode("utf-8", "surrogateescape") if settings.api_key else None

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if key is not None and request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # Header values arrive decoded as latin-1; compared as the bytes the client sent,
            # a non-ASCII key or token is just another key (compare_digest refuses such str).
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), key
            ):
                return JSONResponse(
                    error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                    401,
                    {"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)


class _Generator:
    """Turns a checked request body into an engine request and its HTTP response."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.char_limit = prompt_char_limit(engine.tokenizer, settings.context_length)
        #: Token ids a prompt may hold: the model's embedding rows.
        self.vocab_size = int(engine.registry.model.config.vocab_size)

    async def body(self, request: Request) -> dict:
        """The request's JSON object, within ``--max-body-bytes``."""
        return await json_body(request, self.settings.max_body_bytes)

    async def adapter_of(self, body: dict) -> str | None:
        """The adapter that ``model`` names (None: the base); a combination of adapters
        (``"a*0.7+b*0.3"``) is computed on its first request and cached (see the registry)."""
        name = body.get("model")
        if not isinstance(name, str):
            raise ServeError(400, "model must be a string naming the base or an adapter", "model")
        if name == self.settings.base_name:
            return None
        sources = combination(name)
        if sources is not None:
            # torch work off the engine thread: on a thread that ends (core.threads)
            return await asyncio.to_thread(
                on_passing_thread, self.engine.registry.add_combination, sources
            )
        if not self.engine.registry.is_known(name):
            raise ServeError(
                404, f"model {short_repr(name)} does not exist; see GET /v1/models", "model"
            )
        return name

    def check_chars(self, chars: int, field_name: str) -> None:
        """A 400 naming ``field_name`` for a prompt too long to fit, before any tokenizing."""
        check_prompt_chars(chars, self.char_limit, field_name, self.settings.context_length)

    def encode(self, text: str, field_name: str, special: bool = True) -> list[int]:
        """``text``'s token ids, a 400 naming ``field_name`` unless they fit (a blocking call:
        run it on a worker thread)."""
        self.check_chars(len(text), field_name)
        ids = self.engine.tokenizer(text, add_special_tokens=special)["input_ids"]
        limit = self.settings.context_length
        if not ids:
            raise ServeError(400, f"{field_name} is empty (0 tokens)", field_name)
        if len(ids) >= limit:
            raise ServeError(
                400, f"{field_name} is {len(ids)} tokens; the context length is {limit}", field_name
            )
        return list(ids)

    def check_ids(self, ids: list, field_name: str) -> list[int]:
        """A prompt given as token ids: integers of the vocabulary, fewer than the context."""
        vocab = self.vocab_size
        if not ids:
            raise ServeError(400, f"{field_name} is empty (0 tokens)", field_name)
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ServeError(
                    400,
                    f"{field_name} holds {short_repr(token)}, not a token id in 0..{vocab - 1}",
                    field_name,
                )
        if len(ids) >= self.settings.context_length:
            raise ServeError(
                400,
                f"{field_name} is {len(ids)} tokens; the context length is "
                f"{self.settings.context_length}",
                field_name,
            )
        return ids

    async def run(self, request: Request, body: dict, prompts: list[Prompt], chat: bool):
        adapter = await self.adapter_of(body)
        choose = chat_options if chat else completion_options
        options = choose(body, self.settings.max_logprobs)
        max_tokens, temperature, top_p, top_k, seed = sampling(
            body,
            self.settings,
            max(len(p.ids) for p in prompts),
            self.settings.max_tokens_cap if chat else 16,
            least=0 if options.echo else 1,
        )
        eos = self.engine.tokenizer.eos_token_id
        params = SamplingParams(
            max_tokens,
            temperature,
            top_k or None,
            top_p,
            seed,
            () if eos is None else (eos,),
            logprobs=options.top,
            # max_tokens 0 with echo scores the prompt: the prefill is the whole request
            prompt_logprobs=options.echo and (options.top is not None or max_tokens == 0),
        )
        n = choice_count(body, len(prompts))
        streamed = field(body, "stream", (bool,), False, "a boolean")
        if streamed and (len(prompts) > 1 or n > 1 or options != LogprobOptions()):
            raise ServeError(
                400, "stream is not supported with logprobs, echo, n > 1 or several prompts",
                "stream",
            )  # fmt: skip
        # choice i * n + j: prompt i's j-th independent sample, each with its own generator
        choice_params = [replace(params, seed=s) for s in choice_seeds(seed, n)]
        rows = [(prompt, p) for prompt in prompts for p in choice_params]
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[dict]] = []
        reqs: list[EngineRequest] = []
        try:
            for prompt, row_params in rows:
                events: asyncio.Queue[dict] = asyncio.Queue()
                req = EngineRequest(
                    prompt.ids,
                    adapter,
                    row_params,
                    lambda ev, q=events: loop.call_soon_threadsafe(q.put_nowait, ev),
                    stops(body),
                )
                self.engine.submit(req)
                queues.append(events)
                reqs.append(req)
            reply = Reply(body["model"], chat)
            if streamed:
                (req,), (events,) = reqs, queues
                reqs = []  # the stream frees its row itself
                # cancelled once the response ends, however it ends: a client that hangs up
                # while a chunk is being sent leaves the generator suspended, not closed
                return StreamingResponse(
                    stream(req, events, reply, request),
                    media_type="text/event-stream",
                    background=BackgroundTask(req.cancel),
                )
            results = await asyncio.gather(*(outcome(q) for q in queues))
        finally:
            for req in reqs:
                req.cancel()  # no-op when finished; frees the rows if the client went away
        for _, ev in results:
            if ev["type"] == "error":
                return JSONResponse(error_body(ev["status"], ev["message"]), ev["status"])
        choices = []
        for (prompt, _), (text, done) in zip(rows, results):
            shown, logprobs = choice_logprobs(
                self.engine.tokenizer,
                options,
                chat,
                prompt.ids,
                prompt.text,
                text,
                done["sequence"],
            )
            choices.append((shown, done, logprobs))
        return JSONResponse(reply.full_choices(choices, per_prompt=n))


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids and its text (echoed back with ``echo``)."""

    ids: list[int]
    text: str


def _chat_messages(gen: _Generator, body: dict) -> list[dict[str, str]]:
    """The body's ``messages``, checked (types, a chat template, their length in characters)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ServeError(400, f"messages[{i}] needs a string 'role'", "messages")
        if not isinstance(m.get("content"), str):
            raise ServeError(400, f"messages[{i}].content must be a string", "messages")
        check_text(m["role"] + m["content"], "messages", f"messages[{i}]")
    if not getattr(gen.engine.tokenizer, "chat_template", None):
        raise ServeError(
            400, "the base model's tokenizer has no chat template; use /v1/completions", "messages"
        )
    gen.check_chars(sum(len(m["role"]) + len(m["content"]) for m in messages), "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _chat_prompt(gen: _Generator, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to ``messages``, tokenized (blocking: run it on a thread)."""
    from jinja2 import TemplateError

    try:
        text = gen.engine.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as err:  # templates raise for conversations they do not accept
        raise ServeError(
            400, f"messages: the chat template refused them: {err}", "messages"
        ) from None
    return gen.encode(text, "messages", special=False)


async def _completion_prompts(gen: _Generator, prompt: Any) -> list[Prompt]:
    """The ``prompt`` field as prompts: a string, a list of token ids, or a list of either."""
    is_ids = (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    many = [prompt] if isinstance(prompt, str) or is_ids else prompt
    if not isinstance(many, list) or not many:
        raise ServeError(
            400, "prompt must be a string, a list of token ids, or a list of either", "prompt"
        )
    if len(many) > MAX_CHOICES:
        raise ServeError(400, f"prompt holds {len(many)} prompts; at most {MAX_CHOICES}", "prompt")
    prompts = []
    for item in many:
        if isinstance(item, list):
            ids = gen.check_ids(item, "prompt")
            text = await asyncio.to_thread(gen.engine.tokenizer.decode, ids)
            prompts.append(Prompt(ids, text))
            continue
        if not isinstance(item, str):
            raise ServeError(
                400, "prompt must be a string, a list of token ids, or a list of either", "prompt"
            )
        if not item:  # OpenAI would start at its document separator; not every model has one
            raise ServeError(400, "prompt is empty", "prompt")
        gen.check_chars(len(item), "prompt")
        check_text(item, "prompt")
        prompts.append(Prompt(await asyncio.to_thread(gen.encode, item, "prompt"), item))
    return prompts


def _add_generation_routes(app: FastAPI, gen: _Generator) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await gen.body(request)
        prompts = body.get("prompt")
        await gen.adapter_of(body)  # an unknown model is a 404 before any tokenizing
        return await gen.run(request, body, await _completion_prompts(gen, prompts), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await gen.body(request)
        messages = _chat_messages(gen, body)
        await gen.adapter_of(body)
        prompt_ids = await asyncio.to_thread(_chat_prompt, gen, messages)
        return await gen.run(request, body, [Prompt(prompt_ids, "")], chat=True)


def _add_adapter_routes(app: FastAPI, engine: Engine, settings: ServeSettings) -> None:
    registry = engine.registry

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [model_card(settings.base_name, created)]
        data += [model_card(n, created, settings.base_name) for n in registry.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = await json_body(request, settings.max_body_bytes)
        name = await asyncio.to_thread(registry.add_runtime, body.get("name"), body.get("path"))
        return JSONResponse(model_card(name, int(time.time()), settings.base_name), 201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str, force: bool = True):
        registry.begin_unload(name)  # from now on new requests for it are 404s
        deadline = time.monotonic() + _UNLOAD_WAIT_S
        while registry.pending(name) > 0 or not await asyncio.to_thread(
            registry.finish_unload, name
        ):  # wait for its queued and running requests; the others never notice
            if not force or time.monotonic() > deadline:
                registry.cancel_unload(name)
                raise ServeError(409, f"adapter {short_repr(name)} has requests in flight", "name")
            await asyncio.sleep(0.02)
        return {"id": name, "object": "model", "deleted": True}


def _add_health_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")
