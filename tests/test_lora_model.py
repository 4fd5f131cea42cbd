"""loraq.apply on whole models: targeting, freezing, multi-adapter, merge/unload, PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loraq
from conftest import SmallCNN, cnn_inputs, minilm_path, tiny_bert_cls, tiny_gpt2, tiny_llama
from loraq.model.targeting import find_targets


def _randomize(model: nn.Module, std: float = 0.05) -> None:
    """Give every adapter a non-zero B (and perturb A, magnitude) so merges are not trivial."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and param.requires_grad:  # only the active adapter
                param.add_(torch.randn_like(param) * std)


def _tokens(vocab: int = 64, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


MODELS = {
    "llama": (tiny_llama, lambda m: m(_tokens()).logits),
    "gpt2": (tiny_gpt2, lambda m: m(_tokens()).logits),
    "bert-cls": (tiny_bert_cls, lambda m: m(_tokens()).logits),
}


def _run(model_key: str, model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return MODELS[model_key][1](model)


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merge_unmerge_unload_equivalence(model_key: str, variant: dict) -> None:
    model = MODELS[model_key][0]()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear", **variant))
    _randomize(model)
    expected = _run(model_key, model)
    loraq.merge(model)
    torch.testing.assert_close(_run(model_key, model), expected, rtol=1e-4, atol=1e-5)
    loraq.unmerge(model)
    torch.testing.assert_close(_run(model_key, model), expected, rtol=1e-4, atol=1e-5)
    plain = loraq.unload(model)
    assert not any(isinstance(m, loraq.LoRALayer) for m in plain.modules())
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_run(model_key, plain), expected, rtol=1e-4, atol=1e-5)


def test_merge_unload_small_cnn_all_layer_kinds() -> None:
    model = SmallCNN().eval()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["emb", "conv1", "conv2", "head"]))
    kinds = {n: m.kind for n, m in model.named_modules() if isinstance(m, loraq.LoRALayer)}
    assert kinds == {"emb": "embedding", "conv1": "conv", "conv2": "conv", "head": "linear"}
    _randomize(model)
    inputs = cnn_inputs()
    expected = model(*inputs)
    loraq.merge(model)
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5)
    loraq.unmerge(model)
    plain = loraq.unload(model)
    torch.testing.assert_close(plain(*inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_unload_real_minilm() -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path()).eval()
    tokens = torch.randint(1000, 5000, (2, 12))
    with torch.no_grad():
        base = model(tokens).last_hidden_state
    loraq.apply(
        model,
        loraq.LoraConfig(r=8, alpha=16, targets=["query", "key", "value", "dense"], use_dora=True),
    )
    with torch.no_grad():
        assert torch.equal(model(tokens).last_hidden_state, base)
    _randomize(model, std=0.02)
    with torch.no_grad():
        expected = model(tokens).last_hidden_state
        assert (expected - base).abs().max() > 1e-3
        loraq.merge(model)
        torch.testing.assert_close(model(tokens).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
        loraq.unmerge(model)
        torch.testing.assert_close(model(tokens).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
        plain = loraq.unload(model)
        torch.testing.assert_close(plain(tokens).last_hidden_state, expected, rtol=1e-4, atol=1e-4)


def test_fresh_apply_is_bit_identical_and_training_moves_only_adapters() -> None:
    model = tiny_llama()
    tokens = _tokens(shape=(4, 12))
    with torch.no_grad():
        before = model(tokens).logits
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loraq.apply(
        model, loraq.LoraConfig(r=4, targets="all-linear", modules_to_save=["lm_head"], dropout=0.1)
    )
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(loraq.trainable_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, start[name])
        if name in trainable:
            assert moved or "lora_B" in name and False, name
        else:
            assert not moved, f"frozen parameter {name} changed"
    # the wrapped originals hold exactly the old base tensors
    for key, value in base_state.items():
        wrapped = key.replace("weight", "base_layer.weight") if "proj" in key else key
        if wrapped in model.state_dict() and "lm_head" not in key:
            assert torch.equal(model.state_dict()[wrapped], value), key


def test_training_reduces_loss_on_tiny_causal_lm() -> None:
    # The tiny model's random lm_head (std 0.02) caps the logits, so it trains in full.
    model = tiny_llama()
    loraq.apply(
        model, loraq.LoraConfig(r=8, alpha=16, targets="all-linear", modules_to_save=["lm_head"])
    )
    tokens = torch.arange(16).repeat(4, 1) % 64
    opt = torch.optim.AdamW(loraq.trainable_parameters(model), lr=2e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_targets_list_regex_all_linear_exclude() -> None:
    model = tiny_llama()
    names = find_targets(model, loraq.LoraConfig(targets=["q_proj", "v_proj"]))
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    names = find_targets(model, loraq.LoraConfig(targets=r".*\.mlp\.(gate|up)_proj"))
    assert {n.rsplit(".", 1)[1] for n in names} == {"gate_proj", "up_proj"} and len(names) == 4
    all_lin = find_targets(model, loraq.LoraConfig(targets="all-linear"))
    assert "lm_head" not in all_lin and len(all_lin) == 14
    excl = find_targets(
        model, loraq.LoraConfig(targets="all-linear", exclude=["o_proj", "down_proj"])
    )
    assert len(excl) == 10 and not any(n.endswith(("o_proj", "down_proj")) for n in excl)
    gpt = find_targets(tiny_gpt2(), loraq.LoraConfig(targets="all-linear"))
    assert "lm_head" not in gpt and any(n.endswith("c_attn") for n in gpt)
    bert = find_targets(tiny_bert_cls(), loraq.LoraConfig(targets="all-linear"))
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_multiple_adapters_switch_disable_delete() -> None:
    model = tiny_llama()
    tokens = _tokens()
    base = _run("llama", model)
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["q_proj"]), adapter_name="a")
    _randomize(model)
    out_a = _run("llama", model)
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["v_proj", "q_proj"]), adapter_name="b")
    assert loraq.active_adapter(model) == "b" and loraq.adapter_names(model) == ["a", "b"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    _randomize(model)
    out_b = _run("llama", model)
    loraq.set_adapter(model, "a")
    torch.testing.assert_close(_run("llama", model), out_a)
    with loraq.disable_adapters(model):
        assert torch.equal(_run("llama", model), base)
    assert not torch.equal(_run("llama", model), base)
    loraq.set_adapter(model, "b")
    torch.testing.assert_close(_run("llama", model), out_b)
    loraq.delete_adapter(model, "b")
    assert loraq.adapter_names(model) == ["a"] and loraq.active_adapter(model) == "a"
    assert not any(".b." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_run("llama", model), out_a)
    with pytest.raises(ValueError, match="no adapter 'b'"):
        loraq.set_adapter(model, "b")
    del tokens


def test_modules_to_save_copy_trains_and_disable_uses_original() -> None:
    model = tiny_bert_cls()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"]))
    head = model.classifier
    assert isinstance(head, loraq.ModulesToSave)
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    out = _run("bert-cls", model)
    with loraq.disable_adapters(model):
        off = _run("bert-cls", model)
    assert not torch.equal(out, off)
    plain = loraq.unload(model)
    assert isinstance(plain.classifier, nn.Linear)
    torch.testing.assert_close(_run("bert-cls", plain), out)


def test_bias_modes() -> None:
    model = tiny_llama()
    model = tiny_bert_cls()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["query"], bias="lora_only"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("query.base_layer.bias") for n in trainable)
    assert not any(n.endswith("key.bias") for n in trainable)
    model = tiny_bert_cls()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["query"], bias="all"))
    assert any(n.endswith("key.bias") and p.requires_grad for n, p in model.named_parameters())


def test_summary_counts() -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"]))
    s = loraq.summary(model)
    assert s.trainable_params == 2 * (4 * 32 + 32 * 4)
    assert s.total_params == total + s.trainable_params
    assert s.bytes["adapters"] == 4 * s.trainable_params
    assert "trainable params" in str(s)


# ------------------------------------------------------------------------------ PEFT parity
def _copy_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    peft_state = peft_model.state_dict()
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            if "lora_" not in name:
                continue
            key = "base_model.model." + name
            if "lora_magnitude_vector" in name:
                key += ".weight"
            assert key in peft_state, key
            peft_state[key].copy_(tensor)


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
@pytest.mark.parametrize("model_key", ["llama", "gpt2"])
def test_same_outputs_as_peft(variant: dict, model_key: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = MODELS[model_key][0]()
    targets = ["q_proj", "v_proj", "down_proj"] if model_key == "llama" else ["c_attn", "c_fc"]
    ours = loraq.apply(
        copy.deepcopy(base), loraq.LoraConfig(r=4, alpha=12, targets=targets, **variant)
    )
    _randomize(ours, std=0.1)
    peft_cfg = PeftLoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=targets,
        use_rslora=variant.get("use_rslora", False),
        use_dora=variant.get("use_dora", False),
        fan_in_fan_out=model_key == "gpt2",
    )
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg)
    _copy_into_peft(ours, theirs)
    theirs.eval()
    out_ours = _run(model_key, ours)
    out_theirs = _run(model_key, theirs)
    assert (out_ours - _run(model_key, base)).abs().max() > 1e-3
    assert (out_ours - out_theirs).abs().max() < 1e-5


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
@pytest.mark.parametrize("model_key", ["llama", "gpt2"])
def test_training_with_dropout_draws_peft_masks(variant: dict, model_key: str) -> None:
    """Same seed, training mode, dropout on: loss and every adapter gradient equal PEFT's.

    The inputs are large enough for the compiled mask kernel, so this checks its bits (and the
    order adapters draw in) against ``nn.Dropout`` inside PEFT.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = MODELS[model_key][0]()
    targets = ["q_proj", "v_proj", "down_proj"] if model_key == "llama" else ["c_attn", "c_fc"]
    ours = loraq.apply(
        copy.deepcopy(base), loraq.LoraConfig(r=4, alpha=8, targets=targets, dropout=0.1, **variant)
    )
    _randomize(ours, std=0.1)
    peft_cfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=targets,
        use_dora=variant.get("use_dora", False),
        fan_in_fan_out=model_key == "gpt2",
    )
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg)
    _copy_into_peft(ours, theirs)
    tokens = _tokens(shape=(8, 32))
    grads = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(5)
        loss = model(tokens).logits.square().mean()
        loss.backward()
        named = {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters()}
        grads.append((loss.detach(), {n: g for n, g in named.items() if "lora_" in n}))
    (loss_ours, g_ours), (loss_theirs, g_theirs) = grads
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    assert len(g_ours) == len(g_theirs) > 0
    for name, grad in g_ours.items():
        key = name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")
        torch.testing.assert_close(grad, g_theirs[key], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"LoraConfig.r=0"),
        ({"r": 2.5}, r"LoraConfig.r=2.5"),
        ({"alpha": -1}, r"LoraConfig.alpha=-1"),
        ({"dropout": 1.0}, r"LoraConfig.dropout=1.0"),
        ({"targets": []}, r"LoraConfig.targets=\[\]"),
        ({"targets": "("}, r"valid regular expression"),
        ({"bias": "some"}, r"LoraConfig.bias='some'"),
        ({"init": "xavier"}, r"LoraConfig.init='xavier'"),
        ({"quant": "nf3"}, r"LoraConfig.quant='nf3'"),
        ({"blocksize": 48}, r"LoraConfig.blocksize=48"),
        ({"compute_dtype": "float8"}, r"LoraConfig.compute_dtype='float8'"),
        ({"adapter_bits": 1}, r"LoraConfig.adapter_bits=1"),
        ({"use_dora": "yes"}, r"LoraConfig.use_dora='yes'"),
        ({"modules_to_save": [3]}, r"LoraConfig.modules_to_save"),
        ({"exclude": "all-linear"}, r"LoraConfig.exclude='all-linear'"),
    ],
)
def test_bad_config_errors_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loraq.LoraConfig(**kwargs)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        loraq.LoraConfig.from_dict({"rank": 4})


def test_targets_matching_nothing_lists_real_modules() -> None:
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        loraq.apply(tiny_llama(), loraq.LoraConfig(targets=["query"]))


def test_target_of_unsupported_type_is_named() -> None:
    with pytest.raises(ValueError, match=r"'model.norm' of type LlamaRMSNorm"):
        loraq.apply(tiny_llama(), loraq.LoraConfig(targets=["norm"]))


def test_apply_argument_errors() -> None:
    model = tiny_llama()
    with pytest.raises(TypeError, match="LoraConfig"):
        loraq.apply(model, {"r": 4})
    loraq.apply(model, loraq.LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        loraq.apply(model, loraq.LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'nope'"):
        loraq.apply(
            model, loraq.LoraConfig(targets=["q_proj"], modules_to_save=["nope"]), adapter_name="x"
        )


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_what_trains_is_what_is_saved(bias: str, tmp_path) -> None:
    from safetensors import safe_open

    from loraq.core.naming import disk_key
    from loraq.io.peft_format import PREFIX, WEIGHTS_NAME

    model = tiny_bert_cls()
    config = loraq.LoraConfig(
        r=2, targets=["query", "value"], bias=bias, modules_to_save=["classifier"]
    )
    loraq.apply(model, config, adapter_name="one")
    loraq.apply(model, config.replace(use_dora=True), adapter_name="two")
    for name in ("one", "two"):
        loraq.set_adapter(model, name)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = loraq.adapter_state_dict(model, name)
        params = dict(model.named_parameters())
        assert trained == {k for k in state if k in params}
        if bias != "none":
            assert any(k.endswith("base_layer.bias") for k in trained)
        folder = loraq.save_adapter(model, tmp_path / name, adapter_name=name)
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            saved = set(f.keys())
        assert saved == {PREFIX + disk_key(k, name) for k in state}
