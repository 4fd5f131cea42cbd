"""Mixed-adapter batches: every row equals its adapter run alone, in inference and in training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraq
from conftest import tiny_gpt2, tiny_llama
from loraq.batching import mixed as mixed_op
from loraq.batching.mixed import MixedBatch, RowAdapters
from loraq.batching.rows import layer_rows
from loraq.layers.adapter_quant import enable_adapter_quant
from loraq.layers.qlora import QLoRALayer
from tiny_lm import randomize_adapters, rows_run_alone, single_thread  # noqa: F401


def _layer_with_adapters(base: nn.Module) -> loraq.LoRALayer:
    layer = loraq.LoRALayer(base, rank=4, alpha=8, adapter_name="a")
    layer.add_adapter("b", 8, 4.0)
    if layer.kind != "embedding":
        layer.add_adapter("d", 2, 2.0, use_dora=True)
        layer.add_adapter("k", 4, 4.0)
        layer.adapter_bits["k"] = 4
    randomize_adapters(layer)
    return layer.eval()


def _alone(layer: loraq.LoRALayer, name: str | None, x: torch.Tensor) -> torch.Tensor:
    layer.active_adapters = [] if name is None else [name]
    return layer(x)


BASES = {
    "linear": (lambda: nn.Linear(16, 12), lambda n: torch.randn(n, 3, 16)),
    "linear_2d": (lambda: nn.Linear(16, 12), lambda n: torch.randn(n, 16)),
    "nf4": (
        lambda: QLoRALayer(nn.Linear(64, 24), rank=None).base_layer,
        lambda n: torch.randn(n, 2, 64),
    ),
    "embedding": (
        lambda: nn.Embedding(30, 10, padding_idx=0),
        lambda n: torch.randint(0, 30, (n, 5)),
    ),
}


@pytest.mark.parametrize("bare_row", [True, False], ids=["with-bare-row", "adapters-only"])
@pytest.mark.parametrize("strategy", ["gather", "concat"])
@pytest.mark.parametrize("kind", list(BASES))
def test_mixed_rows_equal_each_adapter_alone(kind, strategy, bare_row, monkeypatch):
    """Without a bare-base row the concatenated form leaves the zero slot out."""
    monkeypatch.setattr(mixed_op, "STRATEGY", strategy)
    make_base, make_x = BASES[kind]
    layer = _layer_with_adapters(make_base())
    names = [n for n in layer.r]
    rows = names + ([None] if bare_row else []) + names[::-1]
    x = make_x(len(rows))
    with torch.no_grad():
        with layer_rows(layer, rows):
            mixed = layer(x)
        for i, name in enumerate(rows):
            expected = _alone(layer, name, x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5)


def test_mixed_model_logits_equal_each_adapter_alone_llama_and_gpt2():
    for build in (tiny_llama, tiny_gpt2):
        model = build()
        loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "a")
        loraq.apply(model, loraq.LoraConfig(r=8, alpha=8, targets="all-linear", use_dora=True), "b")
        loraq.apply(model, loraq.LoraConfig(r=2, targets="all-linear", adapter_bits=4), "c")
        randomize_adapters(model)
        names = ["a", "b", None, "c", "b"]
        ids = torch.randint(0, 64, (len(names), 7))
        with torch.no_grad(), loraq.adapter_rows(model, names):
            mixed = model(ids).logits
        with torch.no_grad():
            for i, name in enumerate(names):
                if name is None:
                    with loraq.disable_adapters(model):
                        expected = model(ids[i : i + 1]).logits
                else:
                    loraq.set_adapter(model, name)
                    expected = model(ids[i : i + 1]).logits
                torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-4, atol=1e-4)


def test_mixed_training_gives_each_adapter_only_its_rows_gradients():
    torch.manual_seed(1)
    model = tiny_llama().train()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear", quant="nf4"), "a")
    loraq.apply(model, loraq.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), "b")
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear", use_dora=True), "d")
    loraq.apply(model, loraq.LoraConfig(r=2, targets="all-linear", adapter_bits=4), "k")
    randomize_adapters(model)
    names = ["a", "b", "a", "d", None, "b", "k"]
    ids = torch.randint(0, 64, (len(names), 6))
    params = {
        n: [p for k, p in model.named_parameters() if "lora_" in k and n in k.split(".")]
        for n in "abdk"
    }
    for group in params.values():
        for p in group:
            p.requires_grad_(True)
    with loraq.adapter_rows(model, names):
        out = model(ids, labels=ids)
    # the model's loss is a mean over rows; per-row sums make rows independent
    logits = out.logits[:, :-1]
    per_token = nn.functional.cross_entropy(
        logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )
    per_token.sum().backward()
    mixed = {n: [p.grad.clone() for p in group] for n, group in params.items()}
    for name, group in params.items():
        model.zero_grad()
        loraq.set_adapter(model, name)
        rows = [i for i, r in enumerate(names) if r == name]
        logits = model(ids[rows]).logits[:, :-1]
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[rows][:, 1:].flatten(), reduction="sum"
        )
        loss.backward()
        for p, g in zip(group, mixed[name]):
            assert p.grad is not None and p.grad.abs().sum() > 0
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_mixed_forward_matches_peft_adapter_names(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    reference = copy.deepcopy(base)
    loraq.apply(
        base, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), "x"
    )
    loraq.apply(base, loraq.LoraConfig(r=8, alpha=16, targets="all-linear"), "y")
    randomize_adapters(base)
    for name in ("x", "y"):
        loraq.save_adapter(base, tmp_path / name, adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "x", adapter_name="x")
    peft_model.load_adapter(tmp_path / "y", adapter_name="y")
    names = ["x", "y", None, "y"]
    ids = torch.randint(0, 64, (len(names), 6))
    with torch.no_grad(), loraq.adapter_rows(base, names):
        ours = base(ids).logits
    with torch.no_grad():
        theirs = peft_model(
            input_ids=ids, adapter_names=["__base__" if n is None else n for n in names]
        ).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mixed_batch_bad_input_names_the_problem():
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear"), "a")
    with pytest.raises(ValueError, match="'zz' is not an adapter of the model"):
        with loraq.adapter_rows(model, ["a", "zz"]):
            pass
    with pytest.raises(TypeError, match="one adapter name"):
        with loraq.adapter_rows(model, "a"):
            pass
    with pytest.raises(ValueError, match="input has 3 rows .* 2 adapter names"):
        with loraq.adapter_rows(model, ["a", None]):
            model(torch.randint(0, 64, (3, 4)))
    with pytest.raises(RuntimeError, match="do not nest"):
        with loraq.adapter_rows(model, ["a"]), loraq.adapter_rows(model, ["a"]):
            pass
    loraq.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with loraq.adapter_rows(model, ["a"]):
            model(torch.randint(0, 64, (1, 4)))
    conv = loraq.LoRALayer(nn.Conv1d(3, 4, 3), rank=2)
    with pytest.raises(TypeError, match="convolution"), layer_rows(conv, ["default"]):
        conv(torch.randn(1, 3, 8))
    saved = tiny_llama()
    loraq.apply(
        saved, loraq.LoraConfig(r=4, targets="all-linear", modules_to_save=["lm_head"]), "m"
    )
    with pytest.raises(ValueError, match="modules_to_save"):
        with loraq.adapter_rows(saved, ["m"]):
            pass


def test_mixed_training_refuses_dora_with_dropout():
    model = tiny_llama().train()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"], use_dora=True, dropout=0.1), "d")
    with pytest.raises(ValueError, match="DoRA adapter 'd' with dropout"):
        with loraq.adapter_rows(model, ["d"]):
            model(torch.randint(0, 64, (1, 4)))


def test_mixed_dropout_keeps_rows_independent():
    torch.manual_seed(3)
    layer = loraq.LoRALayer(nn.Linear(8, 8), rank=2, dropout=0.5, adapter_name="a").train()
    layer.add_adapter("b", 2, 2.0)
    randomize_adapters(layer)
    x = torch.randn(4, 8)
    with layer_rows(layer, ["a", "b", "b", None]):
        out = layer(x)
    base = layer.base_layer(x)
    # row 3 has no adapter; b has no dropout so rows 1 and 2 are deterministic
    torch.testing.assert_close(out[3], base[3])
    layer.active_adapters = ["b"]
    torch.testing.assert_close(out[1:3], layer(x[1:3]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["gather", "concat"])
def test_layer_gradients_per_adapter_both_forms(strategy, monkeypatch):
    monkeypatch.setattr(mixed_op, "STRATEGY", strategy)
    layer = loraq.LoRALayer(nn.Linear(12, 10), rank=2, adapter_name="a").train()
    layer.add_adapter("b", 6, 3.0)
    layer.add_adapter("d", 3, 3.0, use_dora=True)
    randomize_adapters(layer)
    names = ["b", "a", None, "d", "b", "a"]
    x = torch.randn(len(names), 4, 12)
    with layer_rows(layer, names):
        (layer(x) ** 2).sum().backward()
    mixed_grads = {n: [p.grad.clone() for p in layer.adapter_parameters(n)] for n in "abd"}
    for name in "abd":
        layer.zero_grad()
        layer.active_adapters = [name]
        rows = [i for i, n in enumerate(names) if n == name]
        (layer(x[rows]) ** 2).sum().backward()
        for p, g in zip(layer.adapter_parameters(name), mixed_grads[name]):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)


def test_stacked_weights_cache_follows_edits_and_replacements():
    layer = loraq.LoRALayer(nn.Linear(8, 8), rank=2, adapter_name="a").eval()
    layer.add_adapter("b", 2, 2.0)
    randomize_adapters(layer)
    x = torch.randn(2, 8)
    batch = MixedBatch.alone(layer, RowAdapters.from_names(["a", "b"]))  # one cache throughout

    def mixed_out():
        with layer_rows(layer, batch):
            return layer(x)

    with torch.no_grad():
        first = mixed_out()
        layer.lora_B["b"].weight.mul_(2.0)  # in place: the version counter moves
        layer.active_adapters = ["b"]
        torch.testing.assert_close(mixed_out()[1:], layer(x[1:]))
        layer.delete_adapter("a")  # replaced under the same name
        layer.add_adapter("a", 2, 2.0)
        randomize_adapters(layer)
        layer.active_adapters = ["a"]
        out = mixed_out()
        torch.testing.assert_close(out[:1], layer(x[:1]))
        assert not torch.allclose(out[:1], first[:1])


def test_model_stacks_are_built_once_per_adapter_set_and_follow_changes():
    torch.manual_seed(4)
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear"), "a")
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["q_proj"], use_dora=True), "b")
    randomize_adapters(model)
    ids = torch.randint(0, 64, (4, 5))
    plans = (["a", "b", None, "a"], ["b", "b", "a", None], ["a", "a", "a", "a"])
    with torch.no_grad():
        for names in plans:
            with loraq.adapter_rows(model, names):
                mixed = model(ids).logits
            torch.testing.assert_close(mixed, rows_run_alone(model, names, ids))
        cache = model.__dict__["_loraq_mixed_stacks"]
        assert cache.generation == 1  # new row plans reuse the stacked weights
        for name, p in model.named_parameters():
            if "lora_A" in name and ".a." in name:
                p.mul_(1.5)  # in place, as an optimizer step: seen at the next context
        names = plans[0]
        with loraq.adapter_rows(model, names):
            mixed = model(ids).logits
        torch.testing.assert_close(mixed, rows_run_alone(model, names, ids))
        assert cache.generation == 2
        loraq.delete_adapter(model, "b")
        with pytest.raises(ValueError, match="'b' is not an adapter"):
            with loraq.adapter_rows(model, names):
                pass
        loraq.apply(model, loraq.LoraConfig(r=3, targets="all-linear"), "b")
        randomize_adapters(model)
        with loraq.adapter_rows(model, names):
            mixed = model(ids).logits
        torch.testing.assert_close(mixed, rows_run_alone(model, names, ids))


def test_reused_mixed_batch_sees_adapters_added_on_new_layers_between_passes():
    from loraq.batching.rows import mixed_batch

    torch.manual_seed(5)
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj"]), "a")
    randomize_adapters(model)
    names = ["a", None, "a"]
    ids = torch.randint(0, 64, (3, 5))
    batch = mixed_batch(model, names)
    with torch.no_grad():
        with loraq.adapter_rows(model, batch):
            model(ids)
        batch.check_versions = False  # as a decode loop does after its first step
        # a new adapter wraps modules the batch has not seen (up_proj, o_proj, ...)
        loraq.apply(model, loraq.LoraConfig(r=2, targets="all-linear"), "b")
        randomize_adapters(model)
        with loraq.adapter_rows(model, batch):
            mixed = model(ids).logits
        torch.testing.assert_close(mixed, rows_run_alone(model, names, ids))


def test_mixed_batch_refuses_an_adapter_deleted_while_it_is_reused():
    from loraq.batching.rows import mixed_batch

    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear"), "a")
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear"), "b")
    batch = mixed_batch(model, ["a", "b"])
    loraq.delete_adapter(model, "b")
    with pytest.raises(ValueError, match=r"adapters \['b'\] are no longer in the model"):
        with torch.no_grad(), loraq.adapter_rows(model, batch):
            model(torch.randint(0, 64, (2, 3)))


@pytest.mark.parametrize("strategy", ["gather", "concat", "auto"])
def test_rows_without_dora_added_into_the_base_output_equal_each_adapter_alone(
    strategy, monkeypatch
):
    monkeypatch.setattr(mixed_op, "STRATEGY", strategy)
    layer = loraq.LoRALayer(nn.Linear(16, 12), rank=4, alpha=8, adapter_name="a")
    layer.add_adapter("b", 8, 4.0)
    layer.add_adapter("k", 2, 2.0)
    enable_adapter_quant(layer, "k", 4)
    randomize_adapters(layer)
    layer.eval()
    # the third plan uses a subset of the layer's adapters in another order than its stacks
    plans = (["a", "b", None, "k", "b"], ["b", "b", "b"], ["k", None, "b", "k"], [None, None])
    for rows in plans:
        x = torch.randn(len(rows), 3, 16)
        with torch.no_grad():
            with layer_rows(layer, rows):
                mixed = layer(x)
            for i, name in enumerate(rows):
                expected = _alone(layer, name, x[i : i + 1])
                torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5)


def test_stacks_follow_structural_changes_seen_only_by_the_layer_version():
    """With tensor versions unchecked (a decode loop's later steps), k-bit switches and adapters
    replaced by fresh tensors are caught by ``adapter_version`` alone; another layer's change
    leaves this layer's stacks alone."""
    torch.manual_seed(6)
    layer = loraq.LoRALayer(nn.Linear(8, 8), rank=2, adapter_name="a").eval()
    layer.add_adapter("b", 2, 2.0)
    other = loraq.LoRALayer(nn.Linear(8, 8), rank=2, adapter_name="a").eval()
    randomize_adapters(layer)
    x = torch.randn(2, 8)
    batch = MixedBatch.alone(layer, RowAdapters.from_names(["a", "b"]))
    other_batch = MixedBatch.alone(other, RowAdapters.from_names(["a"]))
    with torch.no_grad():
        with layer_rows(layer, batch):
            layer(x)
        with layer_rows(other, other_batch):
            other(x[:1])
        batch.check_versions = other_batch.check_versions = False
        before = layer.adapter_version
        enable_adapter_quant(layer, "b", 3)
        assert layer.adapter_version > before
        with layer_rows(layer, batch):
            out = layer(x)
        torch.testing.assert_close(out[1:], _alone(layer, "b", x[1:]))
        layer.delete_adapter("a")
        layer.add_adapter("a", 3, 3.0)  # fresh tensors; B = 0, so the adapter is a no-op
        with layer_rows(layer, batch):
            out = layer(x)
        torch.testing.assert_close(out[:1], layer.base_layer(x[:1]))
        generation = other_batch.cache.generation
        with layer_rows(other, other_batch):
            other(x[:1])
        assert other_batch.cache.generation == generation  # untouched by the other layer


def test_adapter_view_is_what_the_forward_uses():
    layer = loraq.LoRALayer(nn.Linear(6, 5), rank=3, alpha=6, dropout=0.2, adapter_name="a")
    layer.add_adapter("d", 2, 2.0, use_dora=True)
    enable_adapter_quant(layer, "a", 4)
    randomize_adapters(layer)
    view = layer.adapter_view("a")
    assert (view.rank, view.scale, view.bits, view.use_dora) == (3, 2.0, 4, False)
    assert (view.in_features, view.out_features, view.dtype) == (6, 5, torch.float32)
    assert view.dropout_p == 0.2 and layer.eval().adapter_view("a").dropout_p == 0.0
    a, b = view.factors()
    expected_a, expected_b = layer.adapter_weights("a")
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)
    assert view.tensors() == (layer.lora_A["a"].weight, layer.lora_B["a"].weight)
    assert layer.adapter_view("d").tensors()[2] is layer.lora_magnitude_vector["d"]
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        layer.adapter_view("zz")


def test_decode_steps_gather_once_the_copies_are_reused():
    from loraq.batching.mixed import use_concat

    # a one-off forward of 8 one-token rows over 8 adapters: copying each row's slices costs
    # more than multiplying all 8 side by side
    assert use_concat(8, 1, 8)
    # a decode step: the same rows come back, the copies are kept, only the work counts
    assert not use_concat(8, 1, 8, reused=True)
    assert use_concat(8, 1, 1, reused=True)  # a single slot: nothing to gather
    assert not use_concat(8, 64, 8)  # long prompts gather either way
