"""The lean decode step (loraq.generation.lean_step) against transformers' own forward: the
same logits and cache on every model family it claims, the same tokens through DecodeBatch with
mixed adapters, rows joining and leaving; the models it refuses, and its switch."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import loraq
from loraq.generation import lean_step
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState, run_to_completion
from loraq.generation.lean_step import (
    LEAN_DECODE_ENV,
    LeanDecodeStep,
    LeanDecodeUnsupported,
    lean_decode_step,
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CLAIMED = {
    "llama": ("LlamaConfig", _COMMON),
    "llama-mha-bias": ("LlamaConfig", dict(_COMMON, num_key_value_heads=4, attention_bias=True)),
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=None)),
    "qwen2": ("Qwen2Config", _COMMON),
    "qwen3": ("Qwen3Config", dict(_COMMON, head_dim=16)),
}
REFUSED = {
    "phi3": ("Phi3Config", dict(_COMMON, pad_token_id=0, sliding_window=None)),
    "gemma2": ("Gemma2Config", dict(_COMMON, head_dim=8)),
    "mistral-sliding": ("MistralConfig", dict(_COMMON, sliding_window=16)),
}
# float32 throughout, the same operations in the same order as transformers' sdpa path; what
# may differ is the attention kernel's internal summation (over at most a few dozen keys) and
# the rotary tables computed once per step: a few float32 ulps of logits of order 1
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny(name: str, table=CLAIMED, seed: int = 0):
    """A random model of ``name``'s config, its norms randomized (so a skipped norm shows)."""
    cls, kwargs = table[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.2 + 1.0)
    return model


def with_adapters(model, ranks: dict[str, int] | None = None, dora: bool = False):
    """``model`` in eval mode with random adapters of ``ranks`` (name -> rank; default a and b
    of rank 4) on every linear, alpha twice the rank, DoRA if ``dora``."""
    for i, (name, rank) in enumerate((ranks or {"a": 4, "b": 4}).items()):
        config = loraq.LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", use_dora=dora)
        loraq.apply(model, config, name)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{name}" in pname or (pname.endswith("lora_B") and name in pname):
                    p.normal_(0, 0.2)
    return model.eval()


def prefill(model, rows: list[list[int]]):
    """(cache, mask, last token, next position) after a left-padded prefill of ``rows``."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache()
        )
    return out.cache, mask, out.logits[:, -1].argmax(-1), mask.sum(-1)


def transformers_step(model, last, pos, mask, cache) -> torch.Tensor:
    """The reference: one decode step through transformers' own forward; float32 logits."""
    with torch.no_grad():
        out = model(
            input_ids=last[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            cache=cache,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float()


@pytest.mark.parametrize("name", sorted(CLAIMED))
def test_one_step_equals_transformers_logits_and_cache(name):
    model = tiny(name)
    cache, mask, last, pos = prefill(model, [[5, 6, 7, 8, 9], [3, 4], [1, 2, 3, 4, 5, 6, 7]])
    ours_cache, theirs_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    ours = LeanDecodeStep(model)(last, pos, mask, ours_cache)
    theirs = transformers_step(model, last, pos, mask, theirs_cache)
    torch.testing.assert_close(ours, theirs, **TOL)
    for mine, theirs in zip(ours_cache.layers, theirs_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, **TOL)
        torch.testing.assert_close(mine.values, theirs.values, **TOL)


def generate_all(model, monkeypatch, switch: str, adapters=(None,)):
    """Greedy tokens and per-token log-probabilities of a continuous-batching run in which rows
    join (max_batch 3 of 5 prompts) and leave (different lengths)."""
    monkeypatch.setenv(LEAN_DECODE_ENV, switch)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4]]
    seqs = [
        SequenceState(p, adapters[i % len(adapters)], SamplingParams(6 + 3 * i, logprobs=0))
        for i, p in enumerate(prompts)
    ]
    run_to_completion(model, seqs, max_batch=3, per_row_adapters=adapters != (None,))
    return [s.generated for s in seqs], [[lp.logprob for lp in s.logprobs] for s in seqs]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_decode_batch_tokens_equal_with_mixed_adapters_joins_and_removals(name, monkeypatch):
    model = with_adapters(tiny(name))
    calls = []
    real = LeanDecodeStep.__call__
    monkeypatch.setattr(LeanDecodeStep, "__call__", lambda *a: calls.append(1) or real(*a))
    lean_tokens, lean_lp = generate_all(model, monkeypatch, "auto", ("a", None, "b"))
    assert calls, "the lean step did not run"
    calls.clear()
    tokens, lp = generate_all(model, monkeypatch, "off", ("a", None, "b"))
    assert not calls
    assert lean_tokens == tokens
    for mine, theirs in zip(lean_lp, lp):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), **TOL)


def test_adapters_loaded_after_the_batch_was_made_are_used(monkeypatch):
    # the serving engine makes its batch before any adapter is loaded: the step must look
    # the projections up at every step, not keep the bare ones it saw at construction
    model = tiny("llama")
    runs = {}
    for switch in ("on", "off"):
        monkeypatch.setenv(LEAN_DECODE_ENV, switch)
        runs[switch] = (
            DecodeBatch(model, 0),
            SequenceState([5, 6, 7], "late", SamplingParams(8, logprobs=0)),
        )
    with_adapters(model, {"late": 4})
    for batch, seq in runs.values():
        batch.add([seq])
        while not seq.finished:
            batch.step()
    (_, lean), (_, plain) = runs["on"], runs["off"]
    assert lean.generated == plain.generated
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in lean.logprobs]),
        torch.tensor([lp.logprob for lp in plain.logprobs]),
        **TOL,
    )
    bare = tiny("llama")  # and the adapter changes the tokens, so the test can fail
    monkeypatch.setenv(LEAN_DECODE_ENV, "off")
    seq = SequenceState([5, 6, 7], None, SamplingParams(8, logprobs=0))
    run_to_completion(bare, [seq])
    assert [lp.logprob for lp in seq.logprobs] != [lp.logprob for lp in plain.logprobs]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_it_does_not_claim_keep_transformers(name, monkeypatch):
    model = tiny(name, REFUSED)
    monkeypatch.setenv(LEAN_DECODE_ENV, "auto")
    assert lean_decode_step(model) is None
    monkeypatch.setenv(LEAN_DECODE_ENV, "on")
    with pytest.raises(LeanDecodeUnsupported, match=f"{LEAN_DECODE_ENV}=on but .*: "):
        lean_decode_step(model)


def test_not_a_transformers_model_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setenv(LEAN_DECODE_ENV, "on")
    with pytest.raises(LeanDecodeUnsupported, match="model_type None is not one of"):
        lean_decode_step(torch.nn.Linear(2, 2))


def test_off_never_builds_it_and_a_bad_value_names_the_variable(monkeypatch):
    model = tiny("llama")
    monkeypatch.setenv(LEAN_DECODE_ENV, "off")
    assert lean_decode_step(model) is None
    monkeypatch.setenv(LEAN_DECODE_ENV, "fast")
    with pytest.raises(ValueError, match=f"{LEAN_DECODE_ENV}='fast' is not a known value"):
        lean_decode_step(model)


def test_a_replaced_norm_runs_as_its_module():
    # a norm that is not transformers' RMSNorm (a modules_to_save copy, a custom one) is
    # called, not inlined with RMSNorm's arithmetic
    class Doubling(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    seen = torch.randn(3, 1, 8)
    assert torch.equal(lean_step._rms_norm(Doubling(), seen), 2 * seen)


def test_long_generation_writes_in_place_and_equals_transformers():
    # past MIN_ROOM positions the buffers grow once; between growths a step writes its one
    # position into the buffer: the cache tensors are views with room after them
    model = tiny("llama")
    cache, mask, last, pos = prefill(model, [[5, 6, 7], [1, 2]])
    theirs_cache = copy.deepcopy(cache)
    step = LeanDecodeStep(model)
    starts, full = [], 0
    for _ in range(lean_step.MIN_ROOM + 20):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        ours = step(last, pos, mask, cache)
        theirs = transformers_step(model, last, pos, mask, theirs_cache)
        torch.testing.assert_close(ours, theirs, **TOL)
        keys = cache.layers[0].keys
        full += keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()
        starts.append(keys.data_ptr())
        last, pos = ours.argmax(-1), pos + 1
    assert len(set(starts)) == 2  # the first buffer, and one more after it filled up
    assert full == 1  # the step that filled the first one; torch.cat would be full every step
    step.release()  # the buffers go: the next step copies the cache into a new one
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    held = cache.layers[0].keys
    step(last, pos, mask, cache)
    assert cache.layers[0].keys.data_ptr() != held.data_ptr()
    assert torch.equal(cache.layers[0].keys[:, :, :-1], held)
