"""Prefix caching: a prompt that begins as a recent one (same adapter) is prefilled from that
prompt's cached keys and values, and generates what a full prefill generates; the cache is per
adapter, bounded, and dropped when the adapters change."""

from __future__ import annotations

import pytest
import torch

import loraq
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState
from loraq.generation.prefix_cache import PrefixCache
from tiny_lm import randomize_adapters, single_thread, tiny_causal_lm  # noqa: F401

SHARED = [(7 * i + 3) % 250 for i in range(20)]  # a "system prompt" of 20 tokens


def _kv(tokens: int, value: float = 1.0, layers: int = 2):
    return [
        (torch.full((1, 2, tokens, 4), value), torch.full((1, 2, tokens, 4), -value))
        for _ in range(layers)
    ]


def test_lookup_takes_the_longest_common_prefix_of_the_same_adapter():
    cache = PrefixCache(max_bytes=1 << 20, min_tokens=3)
    cache.store("a", [1, 2, 3, 4, 5], _kv(5, 1.0))
    assert cache.holds("a", [1, 2, 3, 4, 5]) and not cache.holds("b", [1, 2, 3, 4, 5])
    cache.store("a", [1, 2, 3, 4, 5], [])  # held already: kept as it is, made most recent
    assert float(cache.lookup("a", [1, 2, 3, 4, 5, 6])[1][0][0][0, 0, 0, 0]) == 1
    cache.store("a", [1, 2, 3, 9, 9, 9], _kv(6, 2.0))
    cache.store("b", [1, 2, 3, 4, 5, 6], _kv(6, 3.0))
    n, layers = cache.lookup("a", [1, 2, 3, 4, 7])
    assert n == 4 and layers[0][0].shape == (1, 2, 4, 4) and float(layers[0][0][0, 0, 0, 0]) == 1
    assert float(layers[1][1][0, 0, 0, 0]) == -1
    # never the whole prompt: its last token's logits must be computed
    assert cache.lookup("a", [1, 2, 3, 4, 5])[0] == 4
    assert cache.lookup("a", [1, 2, 7])[0] == 0  # 2 < min_tokens
    assert cache.lookup(None, [1, 2, 3, 4, 5, 6])[0] == 0  # the bare base has nothing cached
    assert (cache.hits, cache.misses, cache.reused_tokens) == (3, 2, 13)


def test_the_cache_is_bounded_least_recently_used_first_and_cleared_on_a_new_fingerprint():
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in _kv(8))
    cache = PrefixCache(max_bytes=2 * one, min_tokens=2)
    cache.store("a", list(range(8)), _kv(8))
    cache.store("a", list(range(100, 108)), _kv(8))
    assert cache.lookup("a", list(range(8)) + [5])[0] == 8  # now the most recent
    cache.store("a", list(range(200, 208)), _kv(8))  # evicts the 100.. prompt
    assert len(cache) == 2 and cache.nbytes == 2 * one
    assert cache.lookup("a", list(range(100, 109)))[0] == 0
    assert cache.lookup("a", list(range(9)))[0] == 8
    cache.store("a", list(range(300, 340)), _kv(40))  # alone larger than the bound: not kept
    assert len(cache) == 2
    assert cache.keeps(8, one) and not cache.keeps(40, 5 * one) and not cache.keeps(1, 1)
    cache.check("state 1")
    assert len(cache) == 0  # the first fingerprint differs from "none yet"
    cache.store("a", list(range(8)), _kv(8))
    cache.check("state 1")
    assert len(cache) == 1
    cache.check("state 2")
    assert len(cache) == 0 and cache.nbytes == 0


@pytest.mark.parametrize("bad", [{"max_bytes": -1}, {"min_tokens": 0}, {"max_bytes": 1.5}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PrefixCache(**bad)


@pytest.fixture(scope="module", params=["transformers", "lean"])
def model(request, tmp_path_factory):
    """The tiny Llama with adapters a and b: transformers' model, or the lean model on its
    GGUF file (the one ``loraq serve`` builds)."""
    m = tiny_causal_lm(layers=2, hidden=32)
    if request.param == "lean":
        pytest.importorskip("gguf")
        from loraq.generation.lean_model import LeanLlamaForCausalLM, build_lean_model
        from loraq.io.gguf_read import load_gguf
        from loraq.io.gguf_write import export_gguf

        path = tmp_path_factory.mktemp("lean") / "m.gguf"
        export_gguf(m, path, merged=True, dtype="f32", tokenizer=None)
        m = load_gguf(path, tokenizer=False, build=build_lean_model)[0]
        assert isinstance(m, LeanLlamaForCausalLM)
    for name in ("a", "b"):
        loraq.apply(m, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), adapter_name=name)
    torch.manual_seed(3)
    randomize_adapters(m)
    return m


def _run(model, arrivals, prefix_cache=None):
    """Add each group of (prompt, adapter, prompt_logprobs) as it arrives, step between
    arrivals, and finish: every sequence's tokens and first-token log-probability."""
    batch = DecodeBatch(model, 258, prefix_cache=prefix_cache)
    everyone = []
    for group in arrivals:
        seqs = [
            SequenceState(p, a, SamplingParams(max_new_tokens=6, logprobs=0, prompt_logprobs=lp))
            for p, a, lp in group
        ]
        batch.add(seqs)
        everyone += seqs
        batch.step()
    while batch.sequences:
        batch.remove(batch.finished())
        batch.step()
    return [(s.generated, s.logprobs[0].logprob) for s in everyone]


def test_prefilling_from_cached_prefixes_generates_what_a_full_prefill_does(model):
    arrivals = [
        [(SHARED + [1, 2, 3], "a", False)],
        [(SHARED + [4, 5], "a", False), (SHARED + [6], "b", False)],  # a hit and a miss
        [
            (SHARED + [1, 2, 3], "a", False),  # the same prompt: all but its last token reused
            (SHARED[:10] + [9, 9, 9, 9], "b", False),  # a shorter common prefix with "b"'s
            (SHARED + [7, 7], "a", True),  # prompt_logprobs: prefilled whole
            ([5, 4, 3], None, False),  # too short to share anything
        ],
    ]
    want = _run(model, arrivals)
    cache = PrefixCache(min_tokens=4)
    got = _run(model, arrivals, cache)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, lp_got), (_, lp_want) in zip(got, want):
        assert abs(lp_got - lp_want) < 1e-4  # float32 rounding of other-shaped products
    assert cache.hits == 3  # SHARED+[4,5] (a), SHARED+[1,2,3] again (a), SHARED[:10]+.. (b)
    assert cache.reused_tokens == 20 + 22 + 10


def test_a_repeated_prompt_is_prefilled_by_a_decode_step(model, monkeypatch):
    # every prompt of a group found whole in the cache leaves one token per row: the lean
    # step runs that as a decode step, not the model's forward, and generates the same
    forwards = []
    real = DecodeBatch._forward
    monkeypatch.setattr(
        DecodeBatch, "_forward", lambda *a, **k: forwards.append(1) or real(*a, **k)
    )
    first = [(SHARED + [1, 2, 3], "a", False), (SHARED + [4], "b", False)]
    arrivals = [first, [(SHARED + [1, 2, 3], "a", False)], list(reversed(first))]
    want = _run(model, arrivals)
    forwards.clear()
    got = _run(model, arrivals, PrefixCache(min_tokens=4))
    assert len(forwards) == 1  # the first group only: the later ones were cache hits
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, lp_got), (_, lp_want) in zip(got, want):
        assert abs(lp_got - lp_want) < 1e-4  # float32 rounding of other-shaped products


def test_a_change_of_adapters_drops_the_cached_prefixes():
    model = tiny_causal_lm(layers=1, hidden=16)
    config = loraq.LoraConfig(r=2, alpha=4, targets="all-linear")
    loraq.apply(model, config, adapter_name="a")
    cache = PrefixCache(min_tokens=4)
    batch = DecodeBatch(model, 258, prefix_cache=cache)
    batch.add([SequenceState(SHARED + [1], "a", SamplingParams(max_new_tokens=1))])
    assert len(cache) == 1
    batch.add([SequenceState(SHARED + [2], "a", SamplingParams(max_new_tokens=1))])
    assert cache.hits == 1
    loraq.apply(model, config, adapter_name="c")  # a server loading another adapter
    batch.add([SequenceState(SHARED + [3], "a", SamplingParams(max_new_tokens=1))])
    assert cache.hits == 1 and len(cache) == 1  # dropped, then this prompt stored


def test_prefix_cache_needs_per_row_adapters(model):
    with pytest.raises(ValueError, match="per_row_adapters"):
        DecodeBatch(model, prefix_cache=PrefixCache(), per_row_adapters=False)


def test_prompts_larger_than_the_bound_are_not_kept(model):
    cache = PrefixCache(max_bytes=1024, min_tokens=4)  # less than one prompt's keys
    batch = DecodeBatch(model, 258, prefix_cache=cache)
    batch.add([SequenceState(SHARED + [1], "a", SamplingParams(max_new_tokens=1))])
    assert len(cache) == 0 and cache.nbytes == 0
