"""LoRA on parameters that are not modules (MoE expert stacks): loraq against PEFT's
``target_parameters`` on tiny random Qwen3-MoE and Mixtral models built from transformers configs.

Everything runs in float32: the wrapped module is the same transformers code in both libraries,
and the delta is computed with the same ops, so logits agree to float32 rounding of one matmul
chain (tolerance 1e-5 on logits of size ~1).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loraq
from loraq.io.peft_format import load_adapter, save_adapter
from loraq.layers.param_lora import ParamLoRA
from loraq.model.config import LoraConfig
from loraq.model.surgery import (
    adapter_state_dict,
    apply,
    delete_adapter,
    disable_adapters,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from loraq.quant import QuantizedTensor

peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "mlp.gate.weight"  # Qwen3-MoE's router: a 2-D parameter, not an nn.Linear
TOL = {"atol": 1e-5, "rtol": 1e-5}


def qwen3_moe(seed: int = 0, vocab: int = 64):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        initializer_range=0.2,
    )
    return MixtralForCausalLM(cfg).eval()


MODELS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}


def ids(vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, seed: int = 2) -> None:
    """Nonzero B (a fresh adapter is an exact no-op and would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def ours(base: nn.Module, targets=EXPERTS, **options) -> nn.Module:
    config = LoraConfig(r=2, alpha=4, targets=[], target_parameters=list(targets), **options)
    model = apply(copy.deepcopy(base), config)
    randomize(model)
    return model


def peft_twin(base: nn.Module, model: nn.Module, targets=EXPERTS, **options):
    """PEFT's target_parameters model holding ``model``'s adapter weights."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[], target_parameters=list(targets), **options
    )
    twin = peft.get_peft_model(copy.deepcopy(base), config).eval()
    state = twin.state_dict()
    ours_state = adapter_state_dict(model)
    theirs = {k for k in state if "lora_" in k}
    assert {"base_model.model." + k for k in ours_state} == theirs  # the same names, one to one
    with torch.no_grad():
        for key, tensor in ours_state.items():
            state["base_model.model." + key].copy_(tensor)
    return twin


# ---------------------------------------------------------------------------------- math
@pytest.mark.parametrize("family", sorted(MODELS))
def test_logits_equal_peft_target_parameters(family):
    base = MODELS[family]()
    targets = EXPERTS + ([ROUTER] if family == "qwen3_moe" else [])
    model = ours(base, targets)
    twin = peft_twin(base, model, targets)
    x = ids()
    with torch.no_grad():
        got, want, plain = model(x).logits, twin(x).logits, base(x).logits
    torch.testing.assert_close(got, want, **TOL)
    assert (got - plain).abs().max() > 1e-2  # the adapters do something
    with disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain, **TOL)
    # The wrapped module is left as it was found: no parametrization stays behind.
    experts = model.model.layers[0].mlp.experts.holder
    assert not hasattr(experts, "parametrizations")
    assert isinstance(experts._parameters["gate_up_proj"], nn.Parameter)


def test_rank_is_per_expert_and_layout_is_peft():
    model = ours(qwen3_moe(), EXPERTS + [ROUTER])
    wrapper = model.model.layers[0].mlp.experts
    assert isinstance(wrapper, ParamLoRA) and wrapper.parameter_name == "down_proj"
    assert wrapper.base_layer.parameter_name == "gate_up_proj"  # registered first: innermost
    # down_proj is (E=4, hidden=16, inter=8): in=8, out=16; r=2 per expert.
    assert tuple(wrapper.lora_A["default"].weight.shape) == (8, 8)
    assert tuple(wrapper.lora_B["default"].weight.shape) == (16, 8)
    # Expert e's delta uses A rows [e*r, (e+1)*r) and B columns e, e+E, ... (PEFT's layout).
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    e, r, n = 3, 2, 4
    want = wrapper.scaling["default"] * b[:, e::n] @ a[e * r : (e + 1) * r]
    torch.testing.assert_close(wrapper.delta("default")[e], want)
    router = model.model.layers[0].mlp.gate
    assert tuple(router.lora_A["default"].weight.shape) == (2, 16)  # 2-D: a Linear's pair


def test_is_transposed_layout_matches_peft():
    class Stack(nn.Module):
        is_transposed = True  # stored (experts, in, out), as PEFT reads this flag

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 5, 7))

        def forward(self, x):
            return torch.einsum("ebi,eio->ebo", x, self.w)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = Stack()

        def forward(self, x):
            return self.stack(x)

    torch.manual_seed(0)
    base = Net()
    model = ours(base, ["stack.w"])
    twin = peft_twin(base, model, ["stack.w"])
    assert model.stack.in_features == 5 and model.stack.out_features == 7
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(model(x), twin(x), **TOL)


def test_gradients_reach_adapters_only():
    model = ours(qwen3_moe(), EXPERTS + [ROUTER])
    model.train()
    model(ids(), labels=ids()).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapters = set(adapter_state_dict(model))
    assert with_grad == adapters
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in adapters)
    assert {id(p) for p in trainable_parameters(model)} == {
        id(model.get_parameter(n)) for n in adapters
    }


@pytest.mark.parametrize("family", sorted(MODELS))
def test_merge_unmerge_unload(family):
    base = MODELS[family]()
    model = ours(base)
    x = ids()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        adapted = model(x).logits
        merge(model)
        torch.testing.assert_close(model(x).logits, adapted, **TOL)
        changed = model.model.layers[1].mlp.experts.holder.down_proj
        assert (changed - before["model.layers.1.mlp.experts.down_proj"]).abs().max() > 1e-3
        unmerge(model)
        torch.testing.assert_close(model(x).logits, adapted, **TOL)
        plain = unload(model)
        assert not any(isinstance(m, ParamLoRA) for m in plain.modules())
        assert set(plain.state_dict()) == set(before)  # the plain model's names again
        torch.testing.assert_close(plain(x).logits, adapted, **TOL)


def test_second_adapter_switch_and_delete():
    base = qwen3_moe()
    model = ours(base)
    x = ids()
    with torch.no_grad():
        first = model(x).logits
    apply(model, LoraConfig(r=3, alpha=3, targets=[], target_parameters=EXPERTS), "b")
    wrapper = model.model.layers[0].mlp.experts
    assert set(wrapper.r) == set(wrapper.base_layer.r) == {"default", "b"}  # wrappers reused
    randomize(model, seed=5)
    with torch.no_grad():
        second = model(x).logits
        set_adapter(model, "default")
        again = model(x).logits
    assert (second - again).abs().max() > 1e-3
    delete_adapter(model, "b")
    assert set(wrapper.r) == {"default"}
    with pytest.raises(ValueError, match="must target the same"):
        apply(model, LoraConfig(targets=[], target_parameters=EXPERTS[:1]), "c")
    del first


# ---------------------------------------------------------------------------------- files
def test_saved_adapter_loads_in_peft(tmp_path):
    base = qwen3_moe()
    model = ours(base, EXPERTS + [ROUTER])
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS + [ROUTER] and config["target_modules"] == []
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, **TOL)
    # The file holds exactly PEFT's keys.
    twin.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)


def test_peft_adapter_loads_in_loraq(tmp_path):
    base = qwen3_moe()
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS
    )
    twin = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomize(twin)
    twin.save_pretrained(tmp_path)
    model = load_adapter(copy.deepcopy(base), tmp_path)
    assert sorted(loraq.config_of(model).target_parameters) == sorted(EXPERTS)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, **TOL)


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "options, message",
    [
        ({"target_parameters": ["mlp.experts.nothing"]}, "matched no parameter"),
        ({"target_parameters": ["input_layernorm.weight"]}, "1-D parameter"),
        (
            {"target_parameters": ["self_attn.q_proj.weight"], "targets": ["q_proj"]},
            "adapted or saved as a module",
        ),
    ],
)
def test_bad_targets_refused_with_one_line(options, message):
    base = qwen3_moe()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = LoraConfig(**{"targets": [], **options})
    with pytest.raises(ValueError, match=message) as err:
        apply(base, config)
    assert "\n" not in str(err.value)
    if message == "matched no parameter":
        assert "mlp.experts.nothing" in str(err.value) and "gate_up_proj" in str(err.value)
    assert not any(isinstance(m, ParamLoRA) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    "field, value",
    [("dropout", 0.1), ("use_dora", True), ("init", "pissa"), ("adapter_bits", 4)],
)
def test_options_without_meaning_on_parameters_refused(field, value):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}="):
        LoraConfig(targets=[], target_parameters=EXPERTS, **{field: value})


def test_empty_targets_need_target_parameters():
    with pytest.raises(ValueError, match="LoraConfig.targets=\\[\\]"):
        LoraConfig(targets=[])


def test_a_2d_parameter_is_adapted_like_peft():
    # PEFT reads a 2-D parameter as one (out, in) weight; so do we (the router above is one).
    model = ours(qwen3_moe(), [ROUTER])
    router = model.model.layers[0].mlp.gate
    assert router.num_experts == 1 and (router.in_features, router.out_features) == (16, 4)


# ---------------------------------------------------------------------------------- QLoRA
def qlora(base: nn.Module, targets=EXPERTS) -> nn.Module:
    return ours(base, targets, quant="nf4", compute_dtype="float32", blocksize=64)


def test_quantized_experts_compute_dequantized_base_plus_delta():
    base = qwen3_moe()
    model = qlora(base, EXPERTS + [ROUTER])
    wrapper = model.model.layers[0].mlp.experts
    assert wrapper.is_quantized and wrapper.base_layer.is_quantized
    assert "gate_up_proj" not in dict(wrapper.holder.named_parameters())  # held as NF4 only
    assert len(wrapper.base_layer.base_records) == 4  # one record per expert
    want = torch.stack(
        [
            QuantizedTensor.from_tensor(w, 64, "nf4", True).dequantize()
            for w in base.model.layers[0].mlp.experts.gate_up_proj.detach()
        ]
    )
    torch.testing.assert_close(wrapper.base_layer.base_param(), want, atol=0, rtol=0)
    # The same adapters over the dequantized base, in PEFT, give the same logits.
    dense = unload(copy.deepcopy(model), merge_adapters=False, dense=True)
    assert not any(isinstance(m, ParamLoRA) for m in dense.modules())
    twin = peft_twin(dense, model, EXPERTS + [ROUTER])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, twin(x).logits, **TOL)
    model.train()
    model(x, labels=x).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(
        adapter_state_dict(model)
    )


def test_quantized_experts_merge_unload_and_reload(tmp_path):
    base = qwen3_moe()
    model = qlora(base)
    x = ids()
    save_adapter(model, tmp_path)
    with torch.no_grad():
        before = model(x).logits
    wrapper = model.model.layers[1].mlp.experts
    with torch.no_grad():
        want = wrapper.base_param() + wrapper.delta("default")
        with pytest.warns(UserWarning, match="re-quantization"):
            merge(model)
        # Merging re-quantizes W + ΔW per expert, and reports how far that moved the weights.
        got = wrapper.base_param()
        requantized = torch.stack(
            [QuantizedTensor.from_tensor(w, 64, "nf4", True).dequantize() for w in want]
        )
        torch.testing.assert_close(got, requantized, atol=0, rtol=0)
        assert 0 < (got - want).abs().max() <= model.loraq_merge_error
        unmerge(model)  # re-quantizes W again: the base drifts by up to one NF4 step
    again = load_adapter(copy.deepcopy(base), tmp_path, quant="nf4", compute_dtype="float32")
    assert again.model.layers[0].mlp.experts.is_quantized
    exact = unload(copy.deepcopy(model), dense=True)
    with torch.no_grad():
        # quantization is deterministic: the reloaded QLoRA model is the saved model
        torch.testing.assert_close(again(x).logits, before, atol=0, rtol=0)
        torch.testing.assert_close(exact(x).logits, model(x).logits, **TOL)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_loraq_train_trains_moe_experts(tmp_path, quant):
    from conftest import pattern_config
    from loraq.train.config import load_config
    from loraq.train.loop import train
    from tiny_lm import byte_tokenizer

    folder = tmp_path / "moe"
    qwen3_moe(vocab=260).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    lora = {"r": 4, "alpha": 8, "targets": [], "target_parameters": EXPERTS, "quant": quant}
    path = pattern_config(tmp_path, folder, lora, max_steps=8, num_threads=1, eval_before=False)
    result = train(load_config(path, {"lora.compute_dtype": "float32"}), log=lambda s: None)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS


def test_adapter_file_with_other_rank_refused_and_model_unchanged(tmp_path):
    base = qwen3_moe()
    save_adapter(ours(base), tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 3}))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lora_A.weight' has shape") as err:
        load_adapter(model, tmp_path)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, ParamLoRA) for m in model.modules())


# ------------------------------------------------------------------ paths that refuse or count
def test_summary_counts_parameter_adapters_as_adapters():
    model = ours(qwen3_moe())
    stats = loraq.summary(model)
    factors = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert factors > 0 and stats.trainable_params == factors
    itemsize = 4  # float32 factors
    assert stats.bytes["adapters"] == factors * itemsize


def test_combine_refuses_adapters_on_parameters():
    model = ours(qwen3_moe())
    loraq.apply(model, LoraConfig(r=2, alpha=4, targets=[], target_parameters=EXPERTS), "other")
    before = set(loraq.adapter_names(model))
    with pytest.raises(ValueError, match="combine: adapter 'default' adapts parameters") as err:
        loraq.combine(model, {"default": 0.5, "other": 0.5}, name="both")
    assert "\n" not in str(err.value) and set(loraq.adapter_names(model)) == before


def test_mixed_adapter_batches_refuse_adapters_on_parameters():
    model = ours(qwen3_moe())
    with pytest.raises(ValueError, match=r"experts\.\w+ has adapters on a parameter") as err:
        with loraq.adapter_rows(model, ["default", None]):
            model(ids()[:2])
    assert "\n" not in str(err.value)
