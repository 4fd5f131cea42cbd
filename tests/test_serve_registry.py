"""The serving registry's adapter loads: read off the model lock, once, kept on the host.

No HTTP here: the registry and the engine are driven directly (``tests/test_serve.py`` runs a
real server).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import loraq
from tiny_lm import byte_tokenizer, randomize_adapters, save_tiny_folder, single_thread  # noqa: F401

ADAPTERS = {"alpha": 4, "beta": 8, "gamma": 2, "delta": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("registry")
    base = save_tiny_folder(tmp / "base")
    for i, (name, r) in enumerate(ADAPTERS.items()):
        model = AutoModelForCausalLM.from_pretrained(base)
        loraq.apply(model, loraq.LoraConfig(r=r, alpha=2 * r, targets="all-linear"), name)
        torch.manual_seed(10 + i)
        randomize_adapters(model, 0.5)
        loraq.save_adapter(model, tmp / "adapters" / name, adapter_name=name)
    return base, tmp / "adapters"


def _registry(base: Path, adapters: Path, max_resident: int):
    from transformers import AutoModelForCausalLM

    from loraq.serve.registry import AdapterRegistry

    registry = AdapterRegistry(
        AutoModelForCausalLM.from_pretrained(base).eval(),
        adapter_dir=adapters,
        max_resident=max_resident,
    )
    registry.add_from_dir()
    return registry


@pytest.fixture
def counted_reads(monkeypatch):
    """Every read of an adapter folder by the registry, by name (each read takes 0.1 s, so
    concurrent requests overlap with it)."""
    from loraq.serve import adapter_reads as module

    reads: list[str] = []
    real = module.read_adapter_bytes

    def slow_read(path, adapter_name="default"):
        reads.append(adapter_name)
        time.sleep(0.1)
        return real(path, adapter_name)

    monkeypatch.setattr(module, "read_adapter_bytes", slow_read)
    return reads


def test_concurrent_loads_of_one_adapter_read_it_once(files, counted_reads):
    registry = _registry(*files, max_resident=4)
    registry.prefetch("alpha")  # as Engine.submit does when a request is accepted
    start = threading.Barrier(6)
    results = []

    def take():
        start.wait()
        results.append(registry.acquire("alpha"))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6
    assert counted_reads == ["alpha"]
    assert registry.in_use("alpha") == 6
    assert "loraq_adapter_loads_total 1\n" in registry.metrics.render()
    registry.close()


def test_the_model_lock_is_free_while_a_folder_is_read(files, counted_reads):
    registry = _registry(*files, max_resident=4)
    registry.prefetch("beta")
    assert not registry.is_ready("beta")  # being read (0.1 s)
    assert registry.model_lock.acquire(timeout=0.05)  # a decode step could run meanwhile
    registry.model_lock.release()
    registry.wait_for_reads(["beta"], 5)
    assert registry.is_ready("beta")
    assert registry.acquire("beta")
    assert counted_reads == ["beta"]
    registry.close()


def test_an_evicted_adapter_reloads_from_its_host_copy_until_its_file_changes(
    files, counted_reads, tmp_path
):
    import shutil

    base, adapters = files
    folder = tmp_path / "adapters"
    shutil.copytree(adapters, folder)
    registry = _registry(base, folder, max_resident=1)
    identities = []
    for name in ["alpha", "beta", "alpha"]:
        assert registry.acquire(name)
        identities.append(registry.pool.identity(name))
        registry.release(name)
    assert counted_reads == ["alpha", "beta"]  # alpha came back without the disk
    # the same staged copy: cached prompts of alpha's first load stay valid for the second
    assert identities[0] == identities[2] != identities[1]
    text = registry.metrics.render()
    assert "loraq_adapter_loads_total 3\n" in text
    assert "loraq_adapter_evictions_total 2\n" in text

    # the file rewritten (gamma's weights under alpha's name): read again, and installed
    weights = folder / "alpha" / "adapter_model.safetensors"
    gamma = folder / "gamma"
    shutil.copy(gamma / "adapter_model.safetensors", weights)
    shutil.copy(gamma / "adapter_config.json", folder / "alpha" / "adapter_config.json")
    assert registry.acquire("beta")
    registry.release("beta")
    assert registry.acquire("alpha")
    assert counted_reads == ["alpha", "beta", "alpha"]
    assert set(registry.pool.ranks("alpha").values()) == {ADAPTERS["gamma"]}
    assert registry.pool.identity("alpha") != identities[0]  # new weights: nothing reused
    registry.close()


def _run(engine, requests, timeout: float = 120.0) -> dict[int, dict]:
    """Submit ``requests`` (adapter, prompt ids, max tokens); each one's final event."""
    from loraq.generation.decode import SamplingParams
    from loraq.serve.engine import Request

    done: dict[int, dict] = {}
    texts: dict[int, str] = {}
    finished = threading.Event()

    def emit_for(i: int):
        def emit(event):
            if event["type"] == "text":
                texts[i] = texts.get(i, "") + event["text"]
                return
            done[i] = {**event, "text": texts.get(i, "")}
            if len(done) == len(requests):
                finished.set()

        return emit

    for i, (adapter, prompt, tokens, *stops) in enumerate(requests):
        params = SamplingParams(max_new_tokens=tokens)
        engine.submit(Request(prompt, adapter, params, emit_for(i), tuple(stops)))
    assert finished.wait(timeout)
    return done


@pytest.mark.usefixtures("single_thread")
def test_a_corrupt_adapter_fails_only_its_own_requests_and_names_itself(files, tmp_path):
    import shutil

    from loraq.serve.engine import Engine

    base, adapters = files
    folder = tmp_path / "adapters"
    shutil.copytree(adapters, folder)
    shutil.copytree(adapters / "beta", folder / "broken")
    (folder / "broken" / "adapter_model.safetensors").write_bytes(b"\x08\x00 not safetensors")
    registry = _registry(base, folder, max_resident=4)
    engine = Engine(registry, byte_tokenizer())
    engine.start()
    try:
        prompt = list(b"Once upon")
        done = _run(engine, [("alpha", prompt, 6), ("broken", prompt, 6), ("gamma", prompt, 6)])
    finally:
        engine.stop(30)
    assert done[0]["type"] == "done" and done[2]["type"] == "done"
    assert done[1]["type"] == "error"
    assert done[1]["status"] == 500
    assert "'broken'" in done[1]["message"] and "failed to load" in done[1]["message"]
    assert sorted(registry.resident()) == ["alpha", "gamma"]


@pytest.mark.usefixtures("single_thread")
def test_evictions_while_a_request_runs_leave_its_tokens_unchanged(files):
    """One resident slot beyond alpha's: beta, gamma and delta load and evict one another while
    alpha's long request decodes; its tokens are those it gets alone."""
    from loraq.serve.engine import Engine

    prompt = list(b"The fox")
    alone_registry = _registry(*files, max_resident=2)
    engine = Engine(alone_registry, byte_tokenizer())
    engine.start()
    try:
        alone = _run(engine, [("alpha", prompt, 24)])[0]
    finally:
        engine.stop(30)

    registry = _registry(*files, max_resident=2)
    engine = Engine(registry, byte_tokenizer())
    engine.start()
    try:
        others = [(name, prompt, 2) for name in ["beta", "gamma", "delta", "beta", "gamma"]]
        done = _run(engine, [("alpha", prompt, 24), *others])
    finally:
        engine.stop(30)
    assert all(event["type"] == "done" for event in done.values())
    assert done[0]["text"] == alone["text"]
    assert done[0]["completion_tokens"] == alone["completion_tokens"]
    assert "loraq_adapter_evictions_total" in registry.metrics.render()
    assert registry.metrics.adapter_evictions.value() >= 3


@pytest.mark.usefixtures("single_thread")
def test_unforeseen_failures_fail_their_own_request_and_the_engine_goes_on(files, monkeypatch):
    """An exception the engine does not expect, in a request's set-up before its prefill or in
    its adapter's load, is that request's 500: the others of its group are served, its adapter
    hold is given back, and the engine keeps serving."""
    from loraq.serve import engine as engine_module
    from loraq.serve.engine import Engine

    real_reply = engine_module.ReplyText

    def reply_text(tokenizer, stops):
        if "boom" in stops:
            raise RuntimeError("reply text broke")
        return real_reply(tokenizer, stops)

    monkeypatch.setattr(engine_module, "ReplyText", reply_text)
    registry = _registry(*files, max_resident=4)
    real_acquire = registry.acquire

    def acquire(name):
        if name == "gamma":
            raise RuntimeError("disk on fire")
        return real_acquire(name)

    monkeypatch.setattr(registry, "acquire", acquire)
    engine = Engine(registry, byte_tokenizer())
    engine.start()
    try:
        prompt = list(b"Once upon")
        done = _run(
            engine, [("alpha", prompt, 4, "boom"), ("beta", prompt, 4), ("gamma", prompt, 4)]
        )
        again = _run(engine, [("alpha", prompt, 4)])
    finally:
        engine.stop(30)
    assert done[0]["type"] == "error" and done[0]["status"] == 500
    assert "prefill failed: RuntimeError: reply text broke" in done[0]["message"]
    assert done[1]["type"] == "done" and done[1]["completion_tokens"] == 4
    assert done[2]["type"] == "error" and "'gamma' failed to load" in done[2]["message"]
    assert again[0]["type"] == "done"
    assert registry.in_use("alpha") == 0 and registry.in_use("beta") == 0
