"""The compiled decoder layer (loraq.native.lean_layer, chosen by loraq.generation.native_step)
against the PyTorch lean step it stands in for: the same logits, cache and tokens on GGUF bases
of every family the lean step claims, with mixed adapters of mixed ranks, rows joining and
leaving, adapters loaded mid-generation and buffers that grow; the layers it must leave to
PyTorch; its switch and its input checks."""

from __future__ import annotations

import copy

import pytest
import torch

import loraq
from loraq.generation import lean_step, native_step
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState, run_to_completion
from loraq.generation.lean_step import LeanDecodeStep
from loraq.generation.native_step import NATIVE_ENV, native_layers
from loraq.layers.gguf import LinearGGUF
from loraq.native import lean_layer
from loraq.native.build import MODE_ENV, KernelUnavailableError
from test_lean_step import CLAIMED, prefill, tiny, with_adapters

pytestmark = pytest.mark.skipif(not lean_layer.available(), reason="no C compiler")

# Widths that GGUF's 32-element blocks divide: hidden 64, 4 heads of 16, 2 key/value heads.
WIDE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
MODELS = {name: (cls, dict(kwargs, **WIDE)) for name, (cls, kwargs) in CLAIMED.items()}
# float32 both ways with the same packed matmul; the compiled layer sums RMSNorm statistics,
# attention scores and adapter products (a few dozen terms each) in another order and takes
# expf/sqrtf for torch's: a few float32 ulps per operation over two layers, logits of order 1
TOL = dict(rtol=1e-5, atol=1e-5)


def gguf_model(name: str, quant_type: str = "q4_1"):
    """A tiny random ``name`` model whose projections are float32 GGUF blocks of ``quant_type``."""
    model = tiny(name, MODELS)
    for layer in model.model.layers:
        for parent, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for n in names:
                setattr(parent, n, LinearGGUF.from_linear(getattr(parent, n), quant_type))
    return model


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many layers ran compiled (a list that grows by one per compiled layer)."""
    calls = []
    real = lean_step.run_layer
    monkeypatch.setattr(lean_step, "run_layer", lambda *a: calls.append(1) or real(*a))
    return calls


def _step_both(model, monkeypatch, rows):
    """Logits and caches of one lean step with compiled layers and one without."""
    cache, mask, last, pos = prefill(model, rows)
    mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
    out = {}
    for switch in ("auto", "off"):
        monkeypatch.setenv(NATIVE_ENV, switch)
        step_cache = copy.deepcopy(cache)
        out[switch] = LeanDecodeStep(model)(last, pos, mask, step_cache), step_cache
    return out["auto"], out["off"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_step_equals_the_pytorch_step(name, monkeypatch, compiled_calls):
    model = gguf_model(name)
    (ours, ours_cache), (theirs, theirs_cache) = _step_both(
        model, monkeypatch, [[5, 6, 7, 8, 9], [3, 4], [1, 2, 3, 4, 5, 6, 7]]
    )
    assert len(compiled_calls) == len(model.model.layers)
    torch.testing.assert_close(ours, theirs, **TOL)
    for mine, their in zip(ours_cache.layers, theirs_cache.layers):
        torch.testing.assert_close(mine.keys, their.keys, **TOL)
        torch.testing.assert_close(mine.values, their.values, **TOL)


@pytest.mark.parametrize("quant_type", ["q8_0", "q4_0", "q4_1"])
def test_every_packed_block_type(quant_type, monkeypatch, compiled_calls):
    model = gguf_model("llama", quant_type)
    (ours, _), (theirs, _) = _step_both(model, monkeypatch, [[5, 6, 7], [1, 2]])
    assert compiled_calls
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_float32_weights_run_compiled_too(name, monkeypatch, compiled_calls):
    # plain nn.Linear projections (a transformers folder, stories260K): the dense kind, with
    # mixed adapters; a width no GGUF block divides (CLAIMED's 32 wide, 48 inner)
    model = with_adapters(tiny(name), {"a": 4, "b": 8})
    _generate_both(model, monkeypatch, compiled_calls, ("a", None, "b"))


def _generate(model, monkeypatch, switch: str, adapters, prompts=None, pool=None):
    monkeypatch.setenv(NATIVE_ENV, switch)
    prompts = prompts or [[5, 6, 7, 8, 9], [3, 4], [1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4]]
    seqs = [
        SequenceState(p, adapters[i % len(adapters)], SamplingParams(6 + 3 * i, logprobs=0))
        for i, p in enumerate(prompts)
    ]
    run_to_completion(model, seqs, max_batch=3, adapter_pool=pool)
    return [s.generated for s in seqs], [[lp.logprob for lp in s.logprobs] for s in seqs]


def _generate_both(model, monkeypatch, compiled_calls, adapters):
    """Generate with compiled layers (some must run) and as PyTorch operations (none may),
    assert the two agree, and return the PyTorch run."""
    ours = _generate(model, monkeypatch, "auto", adapters)
    assert compiled_calls
    compiled_calls.clear()
    theirs = _generate(model, monkeypatch, "off", adapters)
    assert not compiled_calls
    _assert_same_generation(ours, theirs)
    return theirs


def _assert_same_generation(ours, theirs):
    assert ours[0] == theirs[0]
    for mine, their in zip(ours[1], theirs[1]):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(their), **TOL)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_mixed_ranks_and_bare_rows_joining_and_leaving(name, monkeypatch, compiled_calls):
    model = with_adapters(gguf_model(name), {"a": 4, "b": 16})
    theirs = _generate_both(model, monkeypatch, compiled_calls, ("a", None, "b"))
    # and the adapters change the tokens, so the comparison can fail
    assert _generate(model, monkeypatch, "off", (None,))[1] != theirs[1]


def test_rows_over_an_adapter_pool_read_each_slots_own_rank(monkeypatch, compiled_calls):
    """A serving pool's stacks carry each slot's rank (the compiled layer reads no padding):
    generation over the pool, compiled and not, equals the model's own adapters'."""
    from loraq.batching.pool import AdapterPool

    model = with_adapters(gguf_model("llama"), {"a": 4, "b": 16})
    pool = AdapterPool(model, capacity=3)
    pool.load_from_model("b")
    pool.load_from_model("a")
    layer = next(iter(pool.ranks("a")))
    assert pool.stacks[layer].ranks.tolist()[:3] == [0, 16, 4]
    rows = ("a", None, "b")
    ours = _generate(model, monkeypatch, "auto", rows, pool=pool)
    assert compiled_calls
    compiled_calls.clear()
    _assert_same_generation(ours, _generate(model, monkeypatch, "off", rows, pool=pool))
    _assert_same_generation(ours, _generate(model, monkeypatch, "off", rows))


def test_an_adapter_loaded_mid_generation_is_seen(monkeypatch, compiled_calls):
    # loading an adapter restacks every layer's adapters: a kept spec would point at the old
    # stacks (freed memory); the step must build the spec again
    outputs = {}
    for switch in ("auto", "off"):
        monkeypatch.setenv(NATIVE_ENV, switch)
        model = with_adapters(gguf_model("llama"), {"a": 8})
        batch = DecodeBatch(model, 0)
        seq = SequenceState([5, 6, 7], "a", SamplingParams(12, logprobs=0))
        batch.add([seq])
        for _ in range(4):
            batch.step()
        with_adapters(model, {"late": 8})
        late = SequenceState([9, 8, 7, 6], "late", SamplingParams(8, logprobs=0))
        batch.add([late])
        while not (seq.finished and late.finished):
            batch.step()
            batch.remove([s for s in batch.sequences if s.finished])
        outputs[switch] = [(s.generated, [lp.logprob for lp in s.logprobs]) for s in (seq, late)]
    assert compiled_calls
    for (tokens, logprobs), (their_tokens, their_logprobs) in zip(outputs["auto"], outputs["off"]):
        assert tokens == their_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(their_logprobs), **TOL)


def test_a_merge_between_generations_is_seen(monkeypatch, compiled_calls):
    # one batch without per-row adapters runs the active adapter: unmerged, its layers stay in
    # PyTorch; a merge re-quantizes the GGUF blocks into new tensors, and the layers kept from
    # before must be built again on them (not run on the old blocks, which they hold)
    outputs, calls = {}, {}
    for switch in ("auto", "off"):
        monkeypatch.setenv(NATIVE_ENV, switch)
        model = with_adapters(gguf_model("llama"), {"a": 8})
        batch = DecodeBatch(model, 0, per_row_adapters=False)
        runs = []
        for merged in (False, True):
            if merged:
                with pytest.warns(UserWarning, match="re-quantization"):
                    loraq.merge(model)
            seq = SequenceState([5, 6, 7], None, SamplingParams(6, logprobs=0))
            batch.add([seq])
            while not seq.finished:
                batch.step()
            batch.remove([seq])
            runs.append((seq.generated, [lp.logprob for lp in seq.logprobs]))
            calls[switch, merged] = len(compiled_calls)
        outputs[switch] = runs
    assert calls["auto", False] == 0 < calls["auto", True]
    for ours, theirs in zip(outputs["auto"], outputs["off"]):
        assert ours[0] == theirs[0]
        torch.testing.assert_close(torch.tensor(ours[1]), torch.tensor(theirs[1]), **TOL)


def test_growing_buffers_over_a_long_generation(monkeypatch, compiled_calls):
    model = with_adapters(gguf_model("qwen2"), {"a": 8})
    prompts = [[5, 6, 7], [1, 2]]
    length = lean_step.MIN_ROOM + 30  # the key/value buffers fill up and grow once
    runs = {}
    for switch in ("auto", "off"):
        monkeypatch.setenv(NATIVE_ENV, switch)
        seqs = [SequenceState(p, "a", SamplingParams(length, logprobs=0)) for p in prompts]
        run_to_completion(model, seqs, max_batch=2)
        runs[switch] = (
            [s.generated for s in seqs],
            [[lp.logprob for lp in s.logprobs] for s in seqs],
        )
    # steps past the first buffer's end ran compiled (the first token comes from the prefill)
    assert len(compiled_calls) > (lean_step.MIN_ROOM + 3) * len(model.model.layers)
    _assert_same_generation(runs["auto"], runs["off"])


def test_dora_and_bf16_layers_stay_in_pytorch(monkeypatch, compiled_calls):
    model = with_adapters(gguf_model("llama"), {"d": 8}, dora=True)
    ours = _generate(model, monkeypatch, "auto", ("d", None))
    assert not compiled_calls  # every layer has DoRA projections
    _assert_same_generation(ours, _generate(model, monkeypatch, "off", ("d", None)))

    half = gguf_model("llama")
    for module in half.modules():
        if isinstance(module, LinearGGUF):
            module.compute_dtype = torch.bfloat16
    (ours_logits, _), _ = _step_both(half, monkeypatch, [[5, 6, 7]])
    assert not compiled_calls
    assert torch.isfinite(ours_logits).all()


def test_more_rows_than_the_limit_run_in_pytorch(monkeypatch, compiled_calls):
    monkeypatch.setattr(native_step, "NATIVE_MAX_ROWS", 2)
    model = gguf_model("llama")
    _step_both(model, monkeypatch, [[5, 6], [1, 2, 3], [4]])
    assert not compiled_calls
    _step_both(model, monkeypatch, [[5, 6], [1, 2, 3]])
    assert compiled_calls


def test_float32_projections_past_the_work_bound_run_in_pytorch(monkeypatch, compiled_calls):
    model = tiny("llama")  # 32 wide, 48 inner: 2 rows x 32 x 48 multiply-adds at most
    monkeypatch.setattr(native_step, "DENSE_MAX_WORK", 2 * 32 * 48 - 1)
    _step_both(model, monkeypatch, [[5, 6], [1, 2, 3]])
    assert not compiled_calls
    monkeypatch.setattr(native_step, "DENSE_MAX_WORK", 2 * 32 * 48)
    _step_both(model, monkeypatch, [[5, 6], [1, 2, 3]])
    assert compiled_calls


def test_switch(monkeypatch):
    model = gguf_model("llama")
    monkeypatch.setenv(NATIVE_ENV, "off")
    assert native_layers(model) is None
    monkeypatch.setenv(NATIVE_ENV, "sometimes")
    with pytest.raises(ValueError, match=NATIVE_ENV):
        native_layers(model)
    monkeypatch.setenv(NATIVE_ENV, "auto")
    assert native_layers(model) is not None
    monkeypatch.setattr(lean_layer, "available", lambda: False)  # as with LORAQ_KERNELS=off
    assert native_layers(model) is None
    monkeypatch.setenv(NATIVE_ENV, "on")
    with pytest.raises(KernelUnavailableError, match=f"{NATIVE_ENV}=on.*{MODE_ENV}"):
        native_layers(model)


def test_run_layer_and_layer_spec_refuse_bad_input():
    spec = torch.zeros(lean_layer.SPEC_SIZE, dtype=torch.int64)
    x = torch.zeros(2, 64)
    cos = sin = torch.zeros(2, 16)
    keep = torch.ones(2, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"float32 tensor of shape \(2, 64\), got torch.float64"):
        lean_layer.run_layer(spec, x.double(), 3, cos, sin, keep)
    with pytest.raises(ValueError, match=r"shape \(2, 5\), got torch.uint8 \(2, 4\)"):
        lean_layer.run_layer(spec, x, 4, cos, sin, keep)
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        lean_layer.run_layer(spec[:-1], x, 3, cos, sin, keep)
    fields = dict.fromkeys(lean_layer.LAYER_FIELDS, 0)
    projection = dict.fromkeys(lean_layer.PROJECTION_FIELDS, 0)
    with pytest.raises(ValueError, match="needs 7 projections, got 6"):
        lean_layer.layer_spec(fields, [projection] * 6)
    del fields["keys"]
    with pytest.raises(KeyError, match="keys"):
        lean_layer.layer_spec(fields, [projection] * 7)


def test_lora_rows_equals_each_rows_own_adapter_product():
    """The per-row LoRA kernel mixed batches use without gradients: ``out += (x A_s^T) B_s`` for
    each row's slot ``s``, reading only each slot's own rank when the ranks are given."""
    gen = torch.Generator().manual_seed(0)
    slots, rank, n_in, n_out, rows, tokens = 4, 8, 40, 24, 5, 3
    own = torch.tensor([0, 8, 3, 5])  # slot 0 is the bare base
    a = torch.randn(slots, rank, n_in, generator=gen)
    b = torch.randn(slots, rank, n_out, generator=gen)
    for s, r in enumerate(own.tolist()):  # a stack's rows past a slot's rank are zeros
        a[s, r:] = 0
        b[s, r:] = 0
    x = torch.randn(rows, tokens, n_in, generator=gen)
    row_slots = torch.tensor([2, 0, 1, 3, 2])
    base = torch.randn(rows, tokens, n_out, generator=gen)
    want = base + torch.stack([x[i] @ a[s].T @ b[s] for i, s in enumerate(row_slots.tolist())])
    # float32, sums of 40 then 8 products: a few ulps of values of order 10
    for ranks in (own, None, torch.tensor([0, 99, 99, 99])):  # a rank past the stack's: clamped
        out = base.clone()
        lean_layer.lora_rows(x, out, a, b, row_slots, ranks)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def test_lora_rows_refuses_bad_input():
    a, b = torch.zeros(3, 2, 4), torch.zeros(3, 2, 5)
    x, out, rows = torch.zeros(2, 1, 4), torch.zeros(2, 1, 5), torch.tensor([0, 2])
    lean_layer.lora_rows(x, out, a, b, rows)
    bad = [
        ((x.double(), out, a, b, rows), r"CPU torch.float32 tensor of shape \(2, 1, 4\), got"),
        ((x, out[:, :, :4], a, b, rows), r"shape \(2, 1, 5\)"),
        ((x, out, a, b, rows.int()), r"torch.int64 tensor of shape \(2,\)"),
        ((x, out, a, b, rows, torch.zeros(2, dtype=torch.long)), r"shape \(3,\)"),
        ((x, out, a, b, torch.tensor([0, 3])), r"row_slots must lie in \[0, 3\), got \[0, 3\]"),
        ((x, out, a, b, torch.tensor([-1, 0])), r"row_slots must lie in \[0, 3\)"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            lean_layer.lora_rows(*args)
