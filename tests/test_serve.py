"""``loraq serve`` as users meet it: a real server process on 127.0.0.1, real HTTP clients."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import loraq
from tiny_lm import byte_tokenizer, randomize_adapters, save_tiny_folder, single_thread  # noqa: F401

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = {
    "alpha": (4, "all-linear"),
    "beta": (8, ["q_proj", "v_proj"]),
    "gamma": (2, "all-linear"),
}
PROMPTS = ["Once upon a time", "The fox", "hello", "zz", "Abc def"]
MAX_POSITIONS = 2048


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_adapters(base: Path, root: Path) -> None:
    from transformers import AutoModelForCausalLM

    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(base)
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=2 * r, targets=targets), name)
        torch.manual_seed(10 + i)
        randomize_adapters(model, 0.5)
        loraq.save_adapter(model, root / name, adapter_name=name)


class Server:
    """A ``loraq serve`` subprocess; always killed by the fixture that starts it."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAQ_API_KEY": ""}
        self.log = open(tmp / f"server-{self.port}.log", "w+")
        cmd = [
            sys.executable,
            "-m",
            "loraq.cli",
            "serve",
            "--port",
            str(self.port),
            "--threads",
            "1",
        ]
        self.proc = subprocess.Popen(cmd + args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300  # a loaded CI machine imports torch slowly
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        output = self.output()
        self.kill()
        raise RuntimeError(f"server did not become healthy:\n{output}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if not self.log.closed:
            self.log.close()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny_folder(tmp / "base", max_positions=MAX_POSITIONS)
    plain = save_tiny_folder(tmp / "plain", chat_template=None)
    adapters = tmp / "adapters"
    _write_adapters(base, adapters)
    return tmp, base, plain, adapters


@pytest.fixture(scope="module")
def server(files):
    tmp, base, _, adapters = files
    (tmp / "outside").mkdir()
    srv = Server(
        [
            "--base",
            str(base),
            "--adapter-dir",
            str(adapters),
            "--api-key",
            KEY,
            "--max-adapters",
            "2",
            "--max-tokens-cap",
            "1800",
            "--max-batch",
            "16",
        ],
        tmp,
    )
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def expected(files):
    """Each adapter's own greedy continuation of each prompt, computed in this process."""
    from transformers import AutoModelForCausalLM

    _, base, _, adapters = files
    model = AutoModelForCausalLM.from_pretrained(base)
    for name in ADAPTERS:
        loraq.load_adapter(model, adapters / name, adapter_name=name)
    tok = byte_tokenizer()
    out = {}
    for name in [*ADAPTERS, None]:
        texts = loraq.generate(model, tok, PROMPTS, [name] * len(PROMPTS), max_new_tokens=12)
        out[name or "base"] = dict(zip(PROMPTS, texts))
    return out


def _complete(client, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    return client.post("/v1/completions", json=body, headers=AUTH)


def test_auth_models_and_health(server):
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/v1/models").status_code == 401
        bad = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "API key" in bad.json()["error"]["message"]
        models = c.get("/v1/models", headers=AUTH).json()["data"]
    ids = {m["id"]: m for m in models}
    assert set(ids) == {"base", *ADAPTERS}
    assert ids["alpha"]["parent"] == "base" and "parent" not in ids["base"]


def test_concurrent_mixed_requests_equal_each_adapter_alone(server, expected):
    jobs = [(m, p) for m in [*ADAPTERS, "base"] for p in PROMPTS]
    deadline = time.monotonic() + 60
    with server.client() as c, cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: _complete(c, *job), jobs))
        assert time.monotonic() < deadline
    for (model, prompt), reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["text"] == expected[model][prompt], (model, prompt)
    # 3 adapters through 2 resident slots: the LRU evicted and reloaded, nothing was lost
    with server.client() as c:
        metrics = c.get("/metrics", headers=AUTH).text
    assert "loraq_resident_adapters 2" in metrics
    assert "loraq_time_to_first_token_seconds_count" in metrics


def test_openai_client_streaming_and_not(server, expected):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    prompt = PROMPTS[0]
    full = client.completions.create(model="beta", prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].text == expected["beta"][prompt]
    assert full.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model="gamma", prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == expected["gamma"][prompt]
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=8, temperature=0
    )
    streamed = client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content and chat.usage.completion_tokens == 8
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_sampling_seed_and_stop(server, expected):
    with server.client() as c:
        kw = {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7, "max_tokens": 16}
        a = _complete(c, "alpha", "hello", **kw).json()["choices"][0]["text"]
        assert _complete(c, "alpha", "hello", **kw).json()["choices"][0]["text"] == a
        whole = expected["alpha"]["hello"]
        stop = whole[4:6]
        cut = _complete(c, "alpha", "hello", stop=[stop]).json()["choices"][0]
        assert cut["text"] == whole[: whole.find(stop)] and cut["finish_reason"] == "stop"


def test_n_choices_are_independent_and_seeded(server):
    """``n`` samples per prompt, ``choices[i].index`` in order; a seed gives the same choices on
    every request, its first choice is the ``n=1`` sample, and other seeds give others."""
    kw = {"temperature": 1.0, "max_tokens": 16, "seed": 7}
    with server.client() as c:
        one = _complete(c, "alpha", "hello", **kw).json()["choices"]
        three = _complete(c, "alpha", "hello", n=3, **kw).json()
        texts = [ch["text"] for ch in three["choices"]]
        assert [ch["index"] for ch in three["choices"]] == [0, 1, 2]
        assert len(set(texts)) == 3  # independent draws, not one sample three times
        assert texts[0] == one[0]["text"]
        again = _complete(c, "alpha", "hello", n=3, **kw).json()["choices"]
        assert [ch["text"] for ch in again] == texts
        other = _complete(c, "alpha", "hello", n=3, **{**kw, "seed": 8}).json()["choices"]
        assert [ch["text"] for ch in other] != texts
        assert three["usage"]["prompt_tokens"] == len(byte_tokenizer()("hello").input_ids)
        assert {ch["finish_reason"] for ch in three["choices"]} == {"length"}  # (seeded)
        assert three["usage"]["completion_tokens"] == 3 * 16
        both = _complete(c, "alpha", ["hello", "zz"], n=2, **kw).json()["choices"]
        assert [ch["index"] for ch in both] == [0, 1, 2, 3]
        assert [ch["text"] for ch in both[:2]] == texts[:2]  # prompt 0's two choices
        chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **kw}
        first = c.post("/v1/chat/completions", json={**chat, "n": 2}, headers=AUTH).json()
        again = c.post("/v1/chat/completions", json={**chat, "n": 2}, headers=AUTH).json()
        replies = [ch["message"]["content"] for ch in first["choices"]]
        assert [ch["index"] for ch in first["choices"]] == [0, 1]
        assert replies == [ch["message"]["content"] for ch in again["choices"]]
        assert replies[0] != replies[1]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("{not json", 400, "malformed JSON"),
        ({"model": "alpha", "prompt": 5}, 400, "prompt"),
        ({"model": "alpha", "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
        ({"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "alpha", "prompt": "x" * 3000}, 400, "context length"),
        ({"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"prompt": "x"}, 400, "model"),
    ],
)
def test_bad_requests_name_the_field(server, body, status, needle):
    with server.client() as c:
        data = body if isinstance(body, str) else json.dumps(body)
        r = c.post(
            "/v1/completions", content=data, headers={**AUTH, "Content-Type": "application/json"}
        )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_runtime_adapter_paths_are_confined(server, files):
    tmp, _, _, adapters = files
    outside = tmp / "outside" / "evil"
    if not outside.exists():
        import shutil

        shutil.copytree(adapters / "alpha", outside)
        (adapters / "link_out").symlink_to(outside, target_is_directory=True)
        pickled = adapters / "pickled"
        shutil.copytree(adapters / "alpha", pickled)
        (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    with server.client() as c:
        for path, needle in [
            ("../outside/evil", "'..'"),
            (str(outside), "relative"),
            ("link_out", "outside --adapter-dir"),
            ("pickled", "pickle"),
            ("missing", "no such adapter folder"),
        ]:
            r = c.post("/v1/adapters", json={"name": "x1", "path": path}, headers=AUTH)
            assert r.status_code in (400, 404) and needle in r.json()["error"]["message"], r.text
        r = c.post("/v1/adapters", json={"name": "bad.name", "path": "alpha"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
        r = c.post("/v1/adapters", json={"name": "alpha2", "path": "alpha"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["parent"] == "base"
        assert _complete(c, "alpha2", "hello").status_code == 200
        assert c.delete("/v1/adapters/alpha2", headers=AUTH).status_code == 200
        assert _complete(c, "alpha2", "hello").status_code == 404
        assert c.delete("/v1/adapters/alpha2", headers=AUTH).status_code == 404


def test_combination_in_model_is_computed_once_and_cached(server, files):
    """``"alpha*0.7+gamma*0.3"``: loraq.combine(method="cat") of the two on the first request,
    the same adapter for the same sources in another order; bad combinations are 400s naming
    ``model``; deleting a source forgets the combinations made from it."""
    from transformers import AutoModelForCausalLM

    _, base, _, adapters = files
    local = AutoModelForCausalLM.from_pretrained(base)
    for name in ("alpha", "gamma"):
        loraq.load_adapter(local, adapters / name, adapter_name=name)
    loraq.combine(local, {"alpha": 0.7, "gamma": 0.3}, method="cat", name="mix")
    want = loraq.generate(local, byte_tokenizer(), PROMPTS[:2], ["mix"] * 2, max_new_tokens=12)
    alone = loraq.generate(local, byte_tokenizer(), PROMPTS[:1], ["alpha"], max_new_tokens=12)
    assert want[0] != alone[0]  # the combination is not just one of its sources
    loraq.load_adapter(local, adapters / "gamma", adapter_name="gamma2")
    loraq.combine(local, {"gamma2": 0.7, "gamma": 0.3}, method="cat", name="mix2")
    again = loraq.generate(local, byte_tokenizer(), PROMPTS[:1], ["mix2"], max_new_tokens=12)
    assert again[0] != want[0]
    with server.client() as c:
        for model, prompt, text in [
            ("alpha*0.7+gamma*0.3", PROMPTS[0], want[0]),
            (" gamma * 0.3 + alpha*0.7", PROMPTS[1], want[1]),  # the cached one
        ]:
            r = _complete(c, model, prompt)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text and r.json()["model"] == model
        listed = {m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]}
        assert listed == {"base", *ADAPTERS}  # a cached combination is no model of its own
        for model, needle in [
            ("alpha*0.7+nope*0.3", "'nope' in the combination is not an adapter"),
            ("alpha*0.7+base*0.3", "'base' in the combination is not an adapter"),
            ("alpha*x+gamma", "is not ADAPTER*WEIGHT"),
            ("alpha*1e999+gamma", "not finite"),
            ("alpha+gamma+beta+alpha2+x", "at most 4"),
            ("alpha*0.5+alpha*0.5", "twice"),
            ("alpha+beta", "adapt different modules"),
        ]:
            r = _complete(c, model, "hello")
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "model", r.text
            assert needle in error["message"] and "\n" not in error["message"], r.text
        r = c.post("/v1/adapters", json={"name": "alpha3", "path": "alpha"}, headers=AUTH)
        assert r.status_code == 201, r.text
        assert (
            _complete(c, "alpha3*0.7+gamma*0.3", PROMPTS[0]).json()["choices"][0]["text"]
            == (want[0])
        )
        assert c.delete("/v1/adapters/alpha3", headers=AUTH).status_code == 200
        r = _complete(c, "alpha3*0.7+gamma*0.3", PROMPTS[0])
        assert r.status_code == 400 and "'alpha3'" in r.json()["error"]["message"], r.text
        # the name back with other weights: the cached combination was forgotten, not reused
        r = c.post("/v1/adapters", json={"name": "alpha3", "path": "gamma"}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = _complete(c, "alpha3*0.7+gamma*0.3", PROMPTS[0])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == again[0], r.text
        assert c.delete("/v1/adapters/alpha3", headers=AUTH).status_code == 200


def test_registry_refuses_adapters_on_parameters(files, tmp_path):
    """The engine runs mixed-adapter batches, which a ParamLoRA cannot join: loading such an
    adapter is a one-line 400 and leaves the model without it."""
    from transformers import AutoModelForCausalLM

    from loraq.serve.registry import AdapterRegistry, ServeError

    _, base, _, _ = files
    trained = AutoModelForCausalLM.from_pretrained(base)
    config = loraq.LoraConfig(r=2, alpha=4, targets=[], target_parameters=["down_proj.weight"])
    loraq.apply(trained, config, "experts")
    loraq.save_adapter(trained, tmp_path / "experts", adapter_name="experts")
    model = AutoModelForCausalLM.from_pretrained(base)
    registry = AdapterRegistry(model, adapter_dir=tmp_path)
    with pytest.raises(ServeError, match="has adapters on a parameter") as err:
        registry.add_runtime("experts", "experts")
    assert err.value.status == 400 and "\n" not in err.value.message
    assert loraq.adapter_names(model) == [] and registry.names() == []
    with pytest.raises(ValueError, match="has adapters on a parameter"):
        AdapterRegistry(trained).add_resident("experts")


def _stream_lines(server, model: str, max_tokens: int, first_only: bool = False) -> list[str]:
    body = {
        "model": model,
        "prompt": "Once",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    lines = []
    with server.client() as c, c.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
                if first_only:
                    break
    return lines


def _metric(server, name: str) -> float:
    with server.client() as c:
        text = c.get("/metrics", headers=AUTH).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_disconnect_frees_the_slot_and_unload_waits(server):
    before = _metric(server, 'loraq_requests_total{outcome="cancelled"}')
    _stream_lines(server, "alpha", 1500, first_only=True)  # hang up after the first chunk
    deadline = time.monotonic() + 15
    while _metric(server, 'loraq_requests_total{outcome="cancelled"}') <= before:
        assert time.monotonic() < deadline, "the abandoned stream kept its slot"
        time.sleep(0.1)
    assert _metric(server, "loraq_running_sequences") == 0
    # unloading an adapter with a request in flight: 409 with force=false, else wait for it
    with cf.ThreadPoolExecutor(1) as pool, server.client() as c:
        running = pool.submit(_stream_lines, server, "gamma", 200)
        deadline = time.monotonic() + 15
        while _metric(server, "loraq_running_sequences") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.delete("/v1/adapters/gamma?force=false", headers=AUTH).status_code == 409
        assert c.delete("/v1/adapters/gamma", headers=AUTH).status_code == 200
        lines = running.result(timeout=60)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_one_failing_request_does_not_stop_the_others(server, files):
    _, _, _, adapters = files
    broken = adapters / "broken"
    broken.mkdir(exist_ok=True)
    for f in (adapters / "alpha").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    with server.client() as c:
        assert (
            c.post(
                "/v1/adapters", json={"name": "broken", "path": "broken"}, headers=AUTH
            ).status_code
            == 500
        )
        with cf.ThreadPoolExecutor(4) as pool:
            good = [pool.submit(_complete, c, "beta", p) for p in PROMPTS]
            assert all(f.result().status_code == 200 for f in good)
        assert c.get("/health").status_code == 200


@pytest.mark.slow  # a second server process: over a minute of start-up on a loaded machine
def test_limits_queue_full_chat_without_template_and_sigterm_drain(files):
    tmp, _, plain, _ = files
    srv = Server(["--base", str(plain), "--max-batch", "1", "--max-queue", "1"], tmp)
    try:
        with srv.client() as c:
            r = c.post(
                "/v1/chat/completions",
                json={"model": "base", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
            body = {"model": "base", "prompt": "x", "max_tokens": 100, "temperature": 0}
            with cf.ThreadPoolExecutor(6) as pool:
                codes = [
                    f.result()
                    for f in [
                        pool.submit(lambda: c.post("/v1/completions", json=body)) for _ in range(6)
                    ]
                ]
            statuses = sorted(r.status_code for r in codes)
            assert 429 in statuses and 200 in statuses
            assert all(r.headers.get("retry-after") == "1" for r in codes if r.status_code == 429)
        # SIGTERM while a stream is running: it completes, then the process exits cleanly
        with cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(_stream_lines, srv, "base", 100)
            deadline = time.monotonic() + 15
            while _metric(srv, "loraq_running_sequences") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            lines = running.result(timeout=60)
        assert lines[-1] == "data: [DONE]"
        # uvicorn re-raises the signal after its graceful shutdown, as supervisors expect
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in srv.output()
    finally:
        srv.kill()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_drains_and_a_second_exits_at_once_with_130_and_one_line(files, presses):
    """One Ctrl-C lets the open stream finish; a second ends the process at once. Either way:
    exit code 130, one line, no traceback."""
    tmp, base, _, _ = files
    srv = Server(["--base", str(base), "--max-tokens-cap", "1800"], tmp)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            running = pool.submit(_stream_lines, srv, "base", 1500)
            deadline = time.monotonic() + 15
            while _metric(srv, "loraq_running_sequences") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGINT)
            if presses == 2:
                time.sleep(0.3)  # the first press is being handled: the stream still runs
                srv.proc.send_signal(signal.SIGINT)
                assert srv.proc.wait(10) == 130
                with pytest.raises(httpx.HTTPError):  # cut, not finished
                    running.result(timeout=30)
            else:
                assert running.result(timeout=60)[-1] == "data: [DONE]"
                assert srv.proc.wait(30) == 130
        output = srv.output()
        lines = [line for line in output.splitlines() if "interrupted" in line]
        want = "loraq serve: interrupted" + (" twice" if presses == 2 else "")
        assert len(lines) == 1 and lines[0].startswith(want), output
        assert "Traceback" not in output and "Error" not in output, output
    finally:
        srv.kill()


def test_serve_command_line_errors(tmp_path, capsys):
    from loraq.cli import main

    anywhere = ["--port", "0"]  # the port is bound first: 8000 may be taken on this machine
    assert main(["serve", "--base", str(tmp_path), *anywhere]) == 2
    assert "expected a transformers folder with config.json" in capsys.readouterr().err
    assert main(["serve", "--base", str(tmp_path), "--adapter", "oops", *anywhere]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    no_dir = ["--adapter-dir", str(tmp_path / "no"), *anywhere]
    assert main(["serve", "--base", str(tmp_path), *no_dir]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", "--base", str(tmp_path), "--prefix-cache-mb", "-1", *anywhere]) == 2
    assert "--prefix-cache-mb must be >= 0, got -1" in capsys.readouterr().err


def test_adapter_dir_scan_skips_unsafe_folders(files, tmp_path):
    import shutil

    from loraq.serve.registry import AdapterRegistry

    _, base, _, adapters = files
    root = tmp_path / "dir"
    shutil.copytree(adapters / "alpha", root / "good")
    shutil.copytree(adapters / "alpha", root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"x")
    shutil.copytree(adapters / "alpha", tmp_path / "elsewhere")
    (root / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    shutil.copytree(adapters / "alpha", root / "bad.name")
    registry = AdapterRegistry(torch.nn.Linear(1, 1), adapter_dir=root)
    added, skipped = registry.add_from_dir()
    assert added == ["good"]
    assert len(skipped) == 3
    assert any("pickle" in m for m in skipped) and any("outside" in m for m in skipped)


def test_lru_loads_and_evictions_are_counted_in_metrics(files):
    """With one resident slot, alpha, beta, alpha load three times and evict twice; a
    resident adapter used again loads nothing; /metrics' text shows both counters."""
    from transformers import AutoModelForCausalLM

    from loraq.serve.engine import Engine
    from loraq.serve.registry import AdapterRegistry

    _, base, _, adapters = files
    registry = AdapterRegistry(
        AutoModelForCausalLM.from_pretrained(base), adapter_dir=adapters, max_resident=1
    )
    registry.add_from_dir()
    engine = Engine(registry, byte_tokenizer())
    assert engine.metrics is registry.metrics
    for name in ["alpha", "alpha", "beta", "alpha"]:
        assert registry.acquire(name)
        registry.release(name)
    assert registry.resident() == ["alpha"]
    text = engine.metrics.render()
    assert "loraq_adapter_loads_total 3\n" in text
    assert "loraq_adapter_evictions_total 2\n" in text


def test_gguf_base_serves_adapters_equal_to_local_generation(files, tmp_path):
    """``--base model.gguf`` (q8_0 blocks kept quantized) with ``--tokenizer``: a real server's
    greedy completions equal loraq.generate over load_gguf with the same adapter."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from loraq.io.gguf_write import export_gguf

    _, base, _, _ = files
    gguf_file = export_gguf(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "base.gguf", merged=True,
        dtype="q8_0",
    )  # fmt: skip
    model, own_tokenizer = loraq.load_gguf(gguf_file)
    # the base folder's tokenizer travels into the file; --tokenizer below still names it
    assert own_tokenizer is not None
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "g")
    torch.manual_seed(3)
    randomize_adapters(model, 0.5)
    loraq.save_adapter(model, tmp_path / "g", adapter_name="g")
    tok = byte_tokenizer()
    prompts = PROMPTS[:3]
    want = {
        name: loraq.generate(model, tok, prompts, [name] * len(prompts), max_new_tokens=8)
        for name in ("g", None)
    }
    args = ["--base", str(gguf_file), "--tokenizer", str(base), "--adapter", f"g={tmp_path / 'g'}"]
    srv = Server(args, tmp_path)
    try:
        with srv.client() as c:
            for name in ("g", None):
                for prompt, text in zip(prompts, want[name]):
                    body = {"model": name or "base", "prompt": prompt, "max_tokens": 8}
                    for _ in range(2):  # the second time from the prefix cache: the same text
                        reply = c.post("/v1/completions", json={**body, "temperature": 0})
                        assert reply.status_code == 200, reply.text
                        assert reply.json()["choices"][0]["text"] == text
            metrics = c.get("/metrics").text
        assert want["g"] != want[None]
        line = next(
            x for x in metrics.splitlines() if x.startswith("loraq_prefix_cache_hits_total")
        )
        hits = float(line.split()[-1])
        from loraq.generation.prefix_cache import DEFAULT_MIN_TOKENS

        # each repeat of a prompt long enough to share (first ones may share prefixes too)
        long = [p for p in prompts if len(tok(p)["input_ids"]) > DEFAULT_MIN_TOKENS]
        assert long and hits >= 2 * len(long)
    finally:
        srv.kill()


def test_gguf_base_command_line_errors(tmp_path, capsys):
    pytest.importorskip("gguf")
    from loraq.cli import main as cli_main
    from loraq.io.gguf_write import export_gguf
    from tiny_lm import tiny_causal_lm

    gguf_file = export_gguf(tiny_causal_lm(), tmp_path / "m.gguf", merged=True, dtype="q8_0")

    def main(argv: list[str]) -> int:  # the port is bound first: 8000 may be taken here
        return cli_main([*argv, "--port", "0"])

    assert main(["serve", "--base", str(gguf_file)]) == 2
    assert "has no vocabulary; pass --tokenizer FOLDER" in capsys.readouterr().err
    assert main(["serve", "--base", str(gguf_file), "--quant", "nf4"]) == 2
    assert "is already quantized" in capsys.readouterr().err
    assert main(["serve", "--base", str(gguf_file), "--tokenizer", str(tmp_path)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    assert main(["serve", "--base", str(tmp_path / "bad.gguf")]) == 2
    assert "bad.gguf" in capsys.readouterr().err
