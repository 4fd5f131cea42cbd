"""``loraq serve`` against hostile clients: no request takes the server down or fails another.

A real uvicorn server on 127.0.0.1 runs in this process (so a test can slow an adapter load or
a tokenizer down to open a race window); every test bounds its traffic in count and time.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time

import pytest
import torch

import loraq
from tiny_lm import byte_tokenizer, randomize_adapters, save_tiny_folder, tiny_causal_lm

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from loraq.batching.pool import AdapterPool  # noqa: E402
from loraq.serve.app import ServeSettings, create_app  # noqa: E402
from loraq.serve.engine import Engine  # noqa: E402
from loraq.serve.registry import AdapterRegistry  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 128
BODY_LIMIT = 64 * 1024
ADAPTERS = ("r1", "r2", "r3")
BLOCK = "\x01block-the-tokenizer\x01"  # a prompt holding this waits in the tokenizer


class GatedTokenizer:
    """The byte tokenizer without BOS (an empty prompt is 0 tokens, as with SmolLM2's); a
    prompt containing :data:`BLOCK` stops in it until ``release`` is set."""

    def __init__(self) -> None:
        from tokenizers import processors

        self._tok = byte_tokenizer()
        self._tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, text, **kw):
        if BLOCK in text:
            self.entered.set()
            self.release.wait(30)
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


class LiveServer:
    """uvicorn serving ``app`` on a free 127.0.0.1 port from a thread of this process."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the in-process server did not become healthy")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kw})

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for i, name in enumerate(ADAPTERS):
        model = tiny_causal_lm(max_positions=CONTEXT)
        loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), name)
        torch.manual_seed(20 + i)
        randomize_adapters(model, 0.5)
        loraq.save_adapter(model, root / name, adapter_name=name)
    tokenizer = GatedTokenizer()
    registry = AdapterRegistry(
        tiny_causal_lm(max_positions=CONTEXT), adapter_dir=root, max_resident=2
    )
    registry.add_from_dir()
    engine = Engine(registry, tokenizer, max_batch=8, max_queue=64)
    settings = ServeSettings(
        api_key=KEY, max_tokens_cap=64, context_length=CONTEXT, max_body_bytes=BODY_LIMIT
    )
    srv = LiveServer(create_app(engine, settings))
    srv.tokenizer, srv.registry, srv.root = tokenizer, registry, root
    try:
        yield srv
    finally:
        tokenizer.release.set()
        srv.close()


def _post(client, path: str, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    return client.post(path, content=data, headers=headers, **kw)


OK = {"model": "r1", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
HUGE = 10**30

# (route, body, status, field named by error.param (None: the body as a whole), text in message)
CASES = [
    ("c", b"[1, 2]", 400, None, "object"),
    ("c", b"null", 400, None, "object"),
    ("c", b'{"model": "r1", "prompt": "\xff\xfe"}', 400, None, "malformed JSON"),
    ("c", b"[" * 100_000 + b"]" * 100_000, 413, None, str(BODY_LIMIT)),
    ("c", b"[" * 30_000 + b"]" * 30_000, 400, None, "malformed JSON"),
    ("c", {**OK, "prompt": ""}, 400, "prompt", "empty"),
    ("c", {**OK, "prompt": [""]}, 400, "prompt", "empty"),
    ("c", {**OK, "prompt": [1, -2]}, 400, "prompt", "token id"),
    ("c", {**OK, "prompt": [[1], "x", 3]}, 400, "prompt", "list of either"),
    ("c", {**OK, "logprobs": 21}, 400, "logprobs", "--max-logprobs"),
    ("c", {**OK, "max_tokens": 0}, 400, "max_tokens", "1.."),
    ("c", {**OK, "logprobs": 1, "stream": True}, 400, "stream", "logprobs"),
    ("c", {**OK, "prompt": "a\ud800b"}, 400, "prompt", "surrogate"),
    ("c", {**OK, "prompt": "x" * (CONTEXT * 5 + 1)}, 400, "prompt", "characters"),
    ("c", {**OK, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("c", {**OK, "max_tokens": HUGE}, 400, "max_tokens", "max_tokens"),
    ("c", {**OK, "max_tokens": 2.5}, 400, "max_tokens", "max_tokens"),
    (
        "c",
        {**OK, "max_tokens": None, "max_completion_tokens": -3},
        400,
        "max_completion_tokens",
        "max_completion_tokens",
    ),  # fmt: skip
    ("c", {**OK, "max_tokens": True}, 400, "max_tokens", "max_tokens"),
    ("c", {**OK, "temperature": float("nan")}, 400, "temperature", "temperature"),
    ("c", {**OK, "temperature": float("inf")}, 400, "temperature", "temperature"),
    ("c", {**OK, "temperature": -0.5}, 400, "temperature", "temperature"),
    ("c", {**OK, "temperature": 10**400}, 400, "temperature", "temperature"),
    ("c", {**OK, "top_p": 0}, 400, "top_p", "top_p"),
    ("c", {**OK, "top_p": 1.5}, 400, "top_p", "top_p"),
    ("c", {**OK, "top_p": float("nan")}, 400, "top_p", "top_p"),
    ("c", {**OK, "top_k": -1}, 400, "top_k", "top_k"),
    ("c", {**OK, "top_k": "5"}, 400, "top_k", "top_k"),
    ("c", {**OK, "seed": 2**64}, 400, "seed", "seed"),
    ("c", {**OK, "seed": -(2**64)}, 400, "seed", "seed"),
    ("c", {**OK, "n": 17}, 400, "n", "n must be in 1..16"),
    ("c", {**OK, "n": 0}, 400, "n", "n must be in 1..16"),
    ("c", {**OK, "n": "1"}, 400, "n", "n"),
    ("c", {**OK, "n": 16, "prompt": ["a"] * 5}, 400, "n", "80 choices; at most 64"),
    ("c", {**OK, "n": 2, "stream": True}, 400, "stream", "n > 1"),
    ("h", {**CHAT, "n": 17}, 400, "n", "n must be in 1..16"),
    ("c", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    ("c", {**OK, "stop": [""]}, 400, "stop", "stop"),
    ("c", {**OK, "stop": 5}, 400, "stop", "stop"),
    ("c", {**OK, "stop": ["y" * 10_000]}, 400, "stop", "characters"),
    ("c", {**OK, "stream": "yes"}, 400, "stream", "stream"),
    ("c", {**OK, "model": 5}, 400, "model", "model"),
    ("c", {**OK, "model": "m" * 10_000}, 404, "model", "does not exist"),
    ("h", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("h", {**CHAT, "messages": "hi"}, 400, "messages", "messages"),
    ("h", {**CHAT, "messages": [{"role": 1, "content": "x"}]}, 400, "messages", "role"),
    ("h", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages", "content"),
    (
        "h",
        {**CHAT, "messages": [{"role": "user", "content": "x" * CONTEXT * 5}]},
        400,
        "messages",
        "characters",
    ),  # fmt: skip
    ("h", {**CHAT, "seed": 2**64}, 400, "seed", "seed"),
    (
        "h",
        {**CHAT, "messages": [{"role": "user", "content": "\udfff"}]},
        400,
        "messages",
        "surrogate",
    ),  # fmt: skip
    ("a", {"name": "ok_name", "path": 5}, 400, "path", "path"),
    ("a", {"name": "bad name", "path": "r1"}, 400, "name", "name"),
    ("a", {"name": "ok_name", "path": "r1\x00"}, 400, "path", "not a usable path"),
    ("a", {"name": "ok_name", "path": "\ud800"}, 400, "path", "not a usable path"),
    ("a", {"name": "ok_name", "path": "x" * 5000}, 400, "path", "not a usable path"),
    ("a", b"[]", 400, None, "object"),
]
ROUTES = {"c": "/v1/completions", "h": "/v1/chat/completions", "a": "/v1/adapters"}


@pytest.mark.parametrize(("route", "body", "status", "param", "needle"), CASES)
def test_hostile_fields_are_client_errors_naming_the_field(
    live, route, body, status, param, needle
):
    with live.client() as c:
        r = _post(c, ROUTES[route], body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and needle in error["message"], error
        assert len(error["message"]) < 400  # a client's long value is not echoed back whole
        assert c.get("/health").status_code == 200


def test_body_over_the_limit_is_413_with_or_without_a_length(live):
    big = json.dumps({**OK, "prompt": "x" * BODY_LIMIT}).encode()
    with live.client() as c:
        declared = _post(c, "/v1/completions", big)

        def chunks():  # no Content-Length: the server must count what it reads
            for i in range(0, len(big), 4096):
                yield big[i : i + 4096]

        chunked = c.post(
            "/v1/completions",
            content=chunks(),
            headers={**AUTH, "Content-Type": "application/json"},
        )
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert "--max-body-bytes" in r.json()["error"]["message"]
        assert str(BODY_LIMIT) in r.json()["error"]["message"]


def test_non_ascii_bearer_token_is_a_401(live):
    with live.client() as c:
        for token in ("Bearer clé-ü".encode(), "Bearer clé-ü".encode("latin-1"), b"Bearer \xff"):
            r = c.get("/v1/models", headers={"Authorization": token})
            assert r.status_code == 401, r.text
        assert c.get("/v1/models", headers=AUTH).status_code == 200


def test_non_ascii_api_key_is_accepted_as_its_utf8_bytes(live):
    from starlette.testclient import TestClient

    key = "clé-ü"
    app = create_app(Engine(live.registry, live.tokenizer), ServeSettings(api_key=key))
    client = TestClient(app)  # no lifespan: /v1/models needs no engine thread
    for token, status in [
        (f"Bearer {key}".encode(), 200),
        (b"Bearer cle-u", 401),
    ]:  # (the test client re-encodes header bytes: latin-1 tokens are tried on a real server)
        assert client.get("/v1/models", headers={"Authorization": token}).status_code == status


def test_health_answers_while_a_prompt_is_tokenized(live):
    gate = live.tokenizer
    gate.entered.clear()
    gate.release.clear()
    with cf.ThreadPoolExecutor(1) as pool, live.client(timeout=10) as c:
        slow = pool.submit(_post, c, "/v1/completions", {**OK, "prompt": BLOCK})
        assert gate.entered.wait(30), "the prompt never reached the tokenizer"
        try:
            health = c.get("/health")  # the event loop is free while the tokenizer works
        finally:
            gate.release.set()
        assert health.status_code == 200
        assert slow.result(timeout=60).status_code == 200


def _slow_loads(monkeypatch, delay: float, loading: threading.Event | None = None):
    """Each write of an adapter into the registry's pool (the part under the model lock; the
    folder is read before it) takes ``delay`` seconds more."""
    real = AdapterPool.load

    def slow_load(pool, name, factors):
        if loading is not None and name == "r2":
            loading.set()
        time.sleep(delay)
        return real(pool, name, factors)

    monkeypatch.setattr(AdapterPool, "load", slow_load)


def _stream_text(client, model: str, max_tokens: int) -> tuple[int, str]:
    body = {"model": model, "prompt": "Once", "max_tokens": max_tokens, "temperature": 0}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        lines = [line for line in r.iter_lines() if line]
    return r.status_code, "\n".join(lines)


def _evict(client, *names: str) -> None:
    """Use ``names`` (a full LRU of 2) so the adapter not named is no longer resident."""
    for name in names:
        assert _post(client, "/v1/completions", {**OK, "model": name}).status_code == 200


def test_delete_waits_for_its_request_and_fails_no_other(live, monkeypatch):
    """The adapter is loaded (slowly) for a request while a DELETE arrives: the DELETE waits
    for that request, which completes, and a long stream on another adapter never notices."""
    loading = threading.Event()
    with live.client() as c, cf.ThreadPoolExecutor(3) as pool:
        _evict(c, "r3", "r1")  # r2 is not resident: its next request loads it
        _slow_loads(monkeypatch, 0.5, loading)
        other = pool.submit(_stream_text, c, "r1", 40)
        mine = pool.submit(_post, c, "/v1/completions", {**OK, "model": "r2"})
        assert loading.wait(30)
        deleted = c.delete("/v1/adapters/r2", headers=AUTH)
        assert deleted.status_code == 200, deleted.text
        reply = mine.result(timeout=60)
        assert reply.status_code == 200, reply.text
        status, text = other.result(timeout=60)
        assert status == 200 and text.endswith("data: [DONE]") and '"error"' not in text, text
        assert _post(c, "/v1/completions", {**OK, "model": "r2"}).status_code == 404
        r = _post(c, "/v1/adapters", {"name": "r2", "path": "r2"})
        assert r.status_code == 201, r.text


def test_adapter_churn_under_load_never_fails_other_models(live, monkeypatch):
    """POST and DELETE r2 over and over while clients use r1, r3 and r2: r1 and r3 always
    succeed; r2's requests succeed or find it gone (404), never a 500."""
    _slow_loads(monkeypatch, 0.2)  # a wide window between the check and the load
    stop = threading.Event()

    def churn(client) -> list[int]:
        codes = []
        for _ in range(6):
            codes.append(client.delete("/v1/adapters/r2", headers=AUTH).status_code)
            codes.append(_post(client, "/v1/adapters", {"name": "r2", "path": "r2"}).status_code)
        stop.set()
        return codes

    def use(client, model: str) -> list[int]:
        codes = []
        while not stop.is_set() and len(codes) < 40:
            body = {**OK, "model": model, "max_tokens": 6}
            codes.append(_post(client, "/v1/completions", body).status_code)
        return codes

    with live.client() as c, cf.ThreadPoolExecutor(7) as pool:  # 6 users and the churn
        users = {m: [pool.submit(use, c, m) for _ in range(2)] for m in ("r1", "r3", "r2")}
        churned = pool.submit(churn, c).result(timeout=90)
        codes = {m: [x for f in fs for x in f.result(timeout=60)] for m, fs in users.items()}
    assert set(churned) <= {200, 201, 404}, churned
    assert codes["r1"] and set(codes["r1"]) == {200}, codes["r1"]
    assert codes["r3"] and set(codes["r3"]) == {200}, codes["r3"]
    assert set(codes["r2"]) <= {200, 404}, codes["r2"]
    with live.client() as c:
        if not live.registry.is_known("r2"):
            assert _post(c, "/v1/adapters", {"name": "r2", "path": "r2"}).status_code == 201
        assert c.get("/health").status_code == 200


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--port", "-1"], "--port must be in 0..65535"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
        (["--host", "203.0.113.7"], "cannot listen on 203.0.113.7"),  # not this machine's
    ],
)
def test_unusable_port_or_host_is_one_line_and_exit_2(
    base_folder, busy_port, where, needle, capsys
):
    from loraq.cli import main

    where = [w.format(busy=busy_port) for w in where]
    args = ["serve", "--base", str(base_folder), "--port", "0", *where]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraq serve: error: ") and needle in err[0], err
