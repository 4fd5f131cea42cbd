"""The serving adapter pool: adapters resident as slots of per-layer stacks, no modules.

Every row of a mixed batch over the pool must compute what the same adapter computes loaded
into the model the usual way and run alone (``set_adapter``), whatever the other rows run, the
slot it landed in, the loads and evictions before it, its rank (stacks grow and shrink), rsLoRA,
DoRA and embedding adapters. Refused loads name what is wrong and change nothing.
"""

from __future__ import annotations

import pytest
import torch

import loraq
from loraq.batching import pool as pool_module
from loraq.batching.pool import AdapterPool, PoolError
from loraq.batching.rows import adapter_rows, mixed_batch
from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState
from loraq.generation.prefix_cache import PrefixCache
from loraq.io.peft_factors import ParameterAdapterError, layer_factors
from loraq.io.peft_format import read_adapter
from loraq.io.safe import FormatError
from loraq.layers.adapter_view import LayerFactors
from tiny_lm import randomize_adapters, rows_run_alone, single_thread, tiny_causal_lm  # noqa: F401

# name -> LoraConfig options; ranks differ so that stacks must grow and shrink
CONFIGS = {
    "r2": dict(r=2, alpha=4, targets="all-linear"),
    "r8": dict(r=8, alpha=8, targets="all-linear", use_rslora=True),
    "attn": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "dora": dict(r=4, alpha=8, targets=["q_proj", "down_proj"], use_dora=True),
    "embed": dict(r=4, alpha=4, targets=["embed_tokens", "o_proj"]),
    "r16": dict(r=16, alpha=16, targets="all-linear"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter of CONFIGS with random factors, saved as a PEFT folder."""
    root = tmp_path_factory.mktemp("pool")
    for i, (name, options) in enumerate(CONFIGS.items()):
        model = tiny_causal_lm()
        loraq.apply(model, loraq.LoraConfig(**options), name)
        torch.manual_seed(100 + i)
        randomize_adapters(model, 0.3)
        loraq.save_adapter(model, root / name, adapter_name=name)
    return root


def _factors(root, name):
    config, tensors, weights = read_adapter(root / name, adapter_name=name, owned=True)
    return layer_factors(config, tensors, weights.name)


def _reference(root, names, ids) -> torch.Tensor:
    """Each row's logits from the model with that row's adapter loaded and active, run alone."""
    model = tiny_causal_lm()
    for name in dict.fromkeys(n for n in names if n is not None):
        loraq.load_adapter(model, root / name, adapter_name=name)
    with torch.no_grad():
        return rows_run_alone(model, names, ids)


def _pooled(model, pool, names, ids) -> torch.Tensor:
    with torch.no_grad(), adapter_rows(model, mixed_batch(model, names, pool=pool)):
        return model(ids).logits


def _ids(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, 7), generator=torch.Generator().manual_seed(seed))


def _close(got, want):
    # float32 logits of a 2-layer, 32-wide model: sums of at most 64 products per layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("writes", ["compiled", "tensor operations"])
def test_rows_over_the_pool_match_each_adapter_run_alone(saved, writes, monkeypatch):
    if writes == "tensor operations":  # the fallback where no compiler exists
        monkeypatch.setattr(pool_module.slot_kernels, "write_slots", lambda _: False)
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=8)
    for name in CONFIGS:
        pool.load(name, _factors(saved, name))
    names = [*CONFIGS, None, "r2", "dora"]
    ids = _ids(len(names))
    _close(_pooled(model, pool, names, ids), _reference(saved, names, ids))
    assert loraq.adapter_names(model) == []  # no adapter modules were added
    assert pool.names() == list(CONFIGS)


def test_slots_reused_after_evictions_and_stacks_grow_and_shrink(saved):
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=3)
    pool.load("r2", _factors(saved, "r2"))
    pool.load("r16", _factors(saved, "r16"))
    layer = next(iter(pool.ranks("r16")))
    assert pool.stacks[layer].a.shape[1] == 16
    pool.evict("r16")  # the largest rank leaves: the layer's stack narrows to what is left
    assert pool.stacks[layer].a.shape[1] == 2
    for name in ("r8", "attn"):
        pool.load(name, _factors(saved, name))
    with pytest.raises(PoolError, match="full"):
        pool.load("dora", _factors(saved, "dora"))
    pool.evict("r2")
    pool.load("dora", _factors(saved, "dora"))  # into r2's old slot
    assert sorted(pool.names()) == ["attn", "dora", "r8"]
    names = ["dora", "r8", None, "attn"]
    ids = _ids(len(names), seed=1)
    _close(_pooled(model, pool, names, ids), _reference(saved, names, ids))
    with pytest.raises(KeyError, match="r2"):
        pool.evict("r2")


def _greedy(batch: DecodeBatch, prompt: list[int], name: str) -> list[int]:
    """Six greedy tokens after ``prompt`` on adapter ``name``, the row removed after."""
    seq = SequenceState(prompt, name, SamplingParams(max_new_tokens=6))
    batch.add([seq])
    while not seq.finished:
        batch.step()
    batch.remove([seq])
    return seq.generated


def test_a_reload_gets_a_new_identity_and_the_prefix_cache_never_reuses_the_old_keys(saved):
    """A prompt cached under one load of a name must not be reused after the name is evicted
    and loaded again from other weights: the reloaded adapter's tokens are its own."""
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=2)
    cache = PrefixCache(1 << 20, min_tokens=2)
    batch = DecodeBatch(model, 258, prefix_cache=cache, adapter_pool=pool)
    prompt = list(range(40, 60))

    pool.load("x", _factors(saved, "r2"))
    first = pool.identity("x")
    as_r2 = _greedy(batch, prompt, "x")
    assert (
        _greedy(batch, prompt, "x") == as_r2 and cache.hits >= 1
    )  # the second run reused the prompt
    pool.evict("x")
    pool.load("x", _factors(saved, "r16"))
    assert pool.identity("x") != first
    hits = cache.hits
    as_r16 = _greedy(batch, prompt, "x")
    assert cache.hits == hits  # nothing cached under the old load was reused
    other = tiny_causal_lm()
    fresh = DecodeBatch(other, 258, adapter_pool=AdapterPool(other, capacity=1))
    fresh.adapter_pool.load("x", _factors(saved, "r16"))
    assert as_r16 == _greedy(fresh, prompt, "x") != as_r2


def test_a_staged_reload_keeps_its_identity_and_its_cached_prompts(saved):
    """Loads of one staged object compute the same rows: after an eviction (and another adapter
    in the slot) its reload answers a cached prompt from the cache, with the same tokens as
    computed fresh; staging the files again is a new identity."""
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=1)
    cache = PrefixCache(1 << 20, min_tokens=2)
    batch = DecodeBatch(model, 258, prefix_cache=cache, adapter_pool=pool)
    prompt = list(range(70, 90))

    staged = pool_module.stage_factors(_factors(saved, "r8"))
    pool.load("x", staged)
    first = pool.identity("x")
    fresh = _greedy(batch, prompt, "x")
    pool.evict("x")
    pool.load("y", pool_module.stage_factors(_factors(saved, "r16")))
    assert _greedy(batch, prompt, "y") != fresh
    pool.evict("y")
    pool.load("x", staged)
    assert pool.identity("x") == first
    hits = cache.hits
    assert _greedy(batch, prompt, "x") == fresh and cache.hits == hits + 1
    pool.evict("x")
    pool.load("x", pool_module.stage_factors(_factors(saved, "r8")))
    assert pool.identity("x") != first


def _state(model, pool):
    return (
        [n for n, _ in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        pool.names(),
        pool.generation,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("model.layers.0.self_attn.q_proj") and f, None),  # fewer modules: fine
        (
            lambda f: {
                **f,
                "model.layers.9.self_attn.q_proj": f["model.layers.0.self_attn.q_proj"],
            },
            "'model.layers.9.self_attn.q_proj', which the model does not have",
        ),
        (
            lambda f: {
                **f,
                "model.layers.1.mlp.up_proj": LayerFactors(
                    torch.zeros(2, 33), torch.zeros(64, 2), 1.0
                ),
            },
            "model.layers.1.mlp.up_proj takes A (2, 32) and B (64, 2), got A (2, 33)",
        ),
        (
            lambda f: {
                **f,
                "model.embed_tokens": LayerFactors(
                    torch.zeros(2, 260), torch.zeros(32, 2), 1.0, torch.ones(32)
                ),
            },
            "model.embed_tokens (embedding) cannot take DoRA",
        ),
        (
            lambda f: {
                **f,
                "model.norm": LayerFactors(torch.zeros(2, 32), torch.zeros(32, 2), 1.0),
            },
            "adapts model.norm (LlamaRMSNorm); the adapter pool runs adapters on linear, "
            "conv1d_gpt2, embedding layers",
        ),
        (lambda f: {}, "adapts no module"),
    ],
)
def test_a_refused_load_names_the_problem_and_changes_nothing(saved, change, message):
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=4)
    pool.load("attn", _factors(saved, "attn"))
    factors = change(dict(_factors(saved, "r2")))
    if message is None:
        pool.load("r2", factors)
        assert "r2" in pool
        return
    before = _state(model, pool)
    with pytest.raises(PoolError, match="r2") as err:
        pool.load("r2", factors)
    assert message in str(err.value) and "\n" not in str(err.value)
    after = _state(model, pool)
    assert after[0] == before[0] and after[2:] == before[2:]
    for key, value in before[1].items():
        assert torch.equal(after[1][key], value), key
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_a_second_load_of_a_name_and_rows_naming_absent_adapters_are_refused(saved):
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=4)
    pool.load("r2", _factors(saved, "r2"))
    with pytest.raises(PoolError, match="'r2' is already in the pool"):
        pool.load("r2", _factors(saved, "r2"))
    with pytest.raises(ValueError, match=r"adapter_names\[1\]='nope' is not resident"):
        mixed_batch(model, ["r2", "nope"], pool=pool)
    with pytest.raises(ValueError, match="capacity >= 1"):
        AdapterPool(model, capacity=0)


def test_an_adapter_of_the_models_own_layers_is_copied_in_exactly(saved):
    """load_from_model: the module adapter's factors (its k-bit grid applied) land in a slot,
    and rows over the pool compute what the module adapter computes."""
    model = tiny_causal_lm()
    loraq.load_adapter(model, saved / "dora", adapter_name="dora")
    loraq.load_adapter(model, saved / "r8", adapter_name="r8")
    pool = AdapterPool(model, capacity=2)
    pool.load_from_model("dora")
    pool.load_from_model("r8")
    names = ["r8", "dora", None]
    ids = _ids(3, seed=2)
    _close(_pooled(model, pool, names, ids), _reference(saved, names, ids))
    with pytest.raises(PoolError, match="no adapter 'gone'"):
        AdapterPool(model, capacity=1).load_from_model("gone")


def _tensors(saved, name):
    config, tensors, weights = read_adapter(saved / name, adapter_name=name, owned=True)
    return config, dict(tensors), weights.name


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (
            lambda c, t: (c.replace(target_parameters=["mlp.down_proj.weight"]), t),
            ParameterAdapterError,
            "has adapters on a parameter",
        ),
        (
            lambda c, t: (c.replace(modules_to_save=["lm_head"]), t),
            FormatError,
            "has modules_to_save ['lm_head']",
        ),
        (
            lambda c, t: (c, {**t, "base_model.model.lm_head.weight": torch.zeros(260, 32)}),
            FormatError,
            "'base_model.model.lm_head.weight' is not a LoRA factor",
        ),
        (
            lambda c, t: (
                c,
                {k: v for k, v in t.items() if "layers.0.mlp.up_proj.lora_B" not in k},
            ),
            FormatError,
            "module 'model.layers.0.mlp.up_proj' needs both LoRA factors",
        ),
        (
            lambda c, t: (c.replace(r=3), t),
            FormatError,
            "do not have the config's rank r=3",
        ),
        (
            lambda c, t: (c.replace(use_dora=True), t),
            FormatError,
            "lora_magnitude_vector' but use_dora is True",
        ),
    ],
)
def test_layer_factors_refuses_what_the_pool_cannot_run(saved, edit, error, message):
    config, tensors, source = _tensors(saved, "r2")
    config, tensors = edit(config, tensors)
    with pytest.raises(error) as err:
        layer_factors(config, tensors, source)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_layer_factors_groups_each_module_with_the_configs_scale(saved):
    config, tensors, source = _tensors(saved, "r8")
    factors = layer_factors(config, tensors, source)
    assert len(factors) == len(tensors) // 2 == 2 * 7  # 2 layers x 7 linear projections
    one = factors["model.layers.1.mlp.down_proj"]
    assert one.a.shape == (8, 64) and one.b.shape == (32, 8) and one.magnitude is None
    assert one.scale == pytest.approx(8 / 8**0.5)  # rsLoRA: alpha / sqrt(r)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    assert torch.equal(one.a, tensors[key])


def test_a_slot_taken_again_keeps_nothing_of_its_last_adapter(saved):
    """An eviction only frees the slot; the next load into it clears what the evicted adapter
    left past its own rank and on the layers it does not adapt (the stacks keep rank 16)."""
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=2)
    pool.load("r8", _factors(saved, "r8"))  # slot 1, all linear layers
    pool.load("r16", _factors(saved, "r16"))  # slot 2: the stacks stay 16 wide
    pool.evict("r8")
    pool.load("r2", _factors(saved, "r2"))  # slot 1 again: rows 2..8 of r8 must go
    layer = next(iter(pool.ranks("r2")))
    assert pool.stacks[layer].a.shape[1] == 16 and pool.slots.index("r2") == 1
    assert not pool.stacks[layer].a[1, 2:].any() and not pool.stacks[layer].b[1, 2:].any()
    pool.evict("r2")
    pool.load("attn", _factors(saved, "attn"))  # q and v only: r2's other layers cleared
    names = ["attn", "r16", None]
    ids = _ids(3, seed=3)
    _close(_pooled(model, pool, names, ids), _reference(saved, names, ids))


def test_staged_reloads_write_what_checked_loads_write(saved, tmp_path, monkeypatch):
    """A staged adapter of a layout the pool has loaded before skips the checks and is written
    by one compiled call: the stacks must hold the same bits as the checked path writes, after
    evictions that leave wider or narrower adapters' rows in the slot."""
    if not pool_module.slot_kernels.available():
        pytest.skip("no C compiler")
    copies = {}  # more adapters of two layouts, each with its own weights
    for base, count in (("r2", 3), ("r16", 2)):
        for i in range(count):
            model = tiny_causal_lm()
            loraq.apply(model, loraq.LoraConfig(**CONFIGS[base]), "x")
            torch.manual_seed(200 + 10 * i + len(copies))
            randomize_adapters(model, 0.3)
            loraq.save_adapter(model, tmp_path / f"{base}_{i}", adapter_name="x")
            copies[f"{base}_{i}"] = _factors(tmp_path, f"{base}_{i}")
    placed = []
    real_place = pool_module.slot_kernels.place_slot
    monkeypatch.setattr(
        pool_module.slot_kernels,
        "place_slot",
        lambda *a: placed.append(a[3]) or real_place(*a),
    )
    staged_model, checked_model = tiny_causal_lm(), tiny_causal_lm()
    staged, checked = AdapterPool(staged_model, 2), AdapterPool(checked_model, 2)

    def same_stacks():
        paths = {m: p for model in (staged_model, checked_model) for p, m in model.named_modules()}
        want = {paths[layer]: stack for layer, stack in checked.stacks.items()}
        assert sorted(want) == sorted(paths[layer] for layer in staged.stacks)
        for layer, got in staged.stacks.items():
            for g, w in zip(got, want[paths[layer]]):
                assert (g is None and w is None) or torch.equal(g, w), paths[layer]

    for step in ["+r2_0", "+r16_0", "-r2_0", "+r16_1", "-r16_0", "+r2_1", "-r16_1", "+r2_2"]:
        name = step[1:]
        for pool, factors in ((staged, pool_module.stage_factors(copies[name])),
                              (checked, copies[name])):  # fmt: skip
            pool.load(name, factors) if step[0] == "+" else pool.evict(name)
        same_stacks()
    # r16_1, r2_1 and r2_2: layouts loaded before, each into a slot another adapter left (r2_0's
    # narrower rows, r16_0's wider ones to clear, r16_1's past the narrowed stack)
    assert placed == [1, 2, 1]
    assert staged.slots == checked.slots
    names = ["r2_1", "r2_2", None]
    ids = _ids(3, seed=4)
    _close(_pooled(staged_model, staged, names, ids), _pooled(checked_model, checked, names, ids))


def test_staging_is_order_free_and_leaves_dora_to_the_checked_path(saved):
    factors = _factors(saved, "r8")
    forward = pool_module.stage_factors(factors)
    backward = pool_module.stage_factors(dict(reversed(list(factors.items()))))
    assert forward.layout == backward.layout
    if pool_module.slot_kernels.available():
        assert torch.equal(forward.records, backward.records)
    else:  # no compiler: every load takes the checked path
        assert forward.records is None and backward.records is None
    dora = pool_module.stage_factors(_factors(saved, "dora"))
    assert dora.records is None
    model = tiny_causal_lm()
    pool = AdapterPool(model, capacity=2)
    pool.load("dora", dora)
    pool.evict("dora")
    pool.load("dora", dora)  # again: still through the checks, still right
    names = ["dora", None]
    ids = _ids(2, seed=5)
    _close(_pooled(model, pool, names, ids), _reference(saved, names, ids))
