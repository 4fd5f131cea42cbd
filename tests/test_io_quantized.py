"""4-bit checkpoints against transformers + bitsandbytes (CPU), QLoRA adapters against PEFT.

bitsandbytes' CPU ``Linear4bit.forward`` in eval mode repacks the weight and runs a different
matmul kernel (docs/formats.md, "How far loraq equals bitsandbytes"), which moves logits by ~2e-3; in train mode it dequantizes
and calls ``F.linear``, like loraq. So the transformers/PEFT side runs in train mode with every
dropout set to 0, where the outputs agree with loraq's to float32 rounding.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import loraq
from conftest import needs, tiny_bert_cls, tiny_gpt2, tiny_llama
from loraq.io import FormatError, load_adapter, save_adapter
from loraq.io.merged_export import export_merged
from loraq.io.quantized import load_quantized, save_quantized
from loraq.layers.quantized import Embedding4bit, Linear4bit, Linear8bit
from loraq.model.targeting import output_head_names

TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def quantize_base(
    model: nn.Module, quant_type: str = "nf4", double_quant: bool = True
) -> nn.Module:
    """Every Linear except the output head -> loraq Linear4bit (what LoraConfig(quant=...) does)."""
    heads = output_head_names(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in heads:
            parent, _, leaf = name.rpartition(".")
            q = Linear4bit.from_linear(module, quant_type, 64, double_quant, torch.float32)
            setattr(model.get_submodule(parent), leaf, q)
    return model


def _logits(model: nn.Module, train: bool = False) -> torch.Tensor:
    model.train(train)
    if train:  # train mode only for bnb's plain matmul path (see the module docstring)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _randomize(model: nn.Module, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _hf_load(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return _quiet(AutoModelForCausalLM.from_pretrained, str(path), device_map="cpu")


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A loraq NF4 (double-quant) Llama and the checkpoint save_quantized wrote for it."""
    torch.manual_seed(0)
    model = quantize_base(tiny_llama(hidden=64)).eval()
    path = save_quantized(model, tmp_path_factory.mktemp("q") / "nf4")
    return model, path


# ---------------------------------------------------------------------------------- loraq only
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_roundtrip_is_byte_identical(quant_type: str, double_quant: bool, tmp_path: Path) -> None:
    model = quantize_base(tiny_llama(hidden=64), quant_type, double_quant).eval()
    save_quantized(model, tmp_path / "a")
    loaded = load_quantized(tmp_path / "a")
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            theirs = loaded.get_submodule(name)
            assert isinstance(theirs, Linear4bit)
            for field, tensor in module.qweight.tensors().items():
                if tensor is not None:
                    assert torch.equal(tensor, theirs.qweight.tensors()[field]), (name, field)
    assert torch.equal(_logits(loaded), _logits(model))
    assert not any(p.requires_grad for p in loaded.parameters())
    save_quantized(loaded, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    config_a, config_b = (json.loads((tmp_path / x / "config.json").read_text()) for x in "ab")
    assert config_b.pop("_name_or_path") == str(tmp_path / "a")  # where it was loaded from
    config_a.pop("_name_or_path")
    assert config_a == config_b
    qconfig = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qconfig == {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }  # fmt: skip


def test_adapters_are_left_out_of_the_base(ours, tmp_path: Path) -> None:
    model, path = ours
    wrapped = loraq.apply(
        copy.deepcopy(model), loraq.LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"])
    )
    _randomize(wrapped)
    save_quantized(wrapped, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (
        path / "model.safetensors"
    ).read_bytes()


def test_8bit_and_4bit_embeddings_use_loraq_layout(tmp_path: Path) -> None:
    model = tiny_llama(hidden=64).eval()
    model.model.embed_tokens = Embedding4bit.from_embedding(model.model.embed_tokens)
    for layer in model.model.layers:
        layer.mlp.up_proj = Linear8bit.from_linear(layer.mlp.up_proj)
        layer.self_attn.q_proj = Linear4bit.from_linear(layer.self_attn.q_proj)
    save_quantized(model, tmp_path)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (
        qconfig["quant_method"] == "loraq"
        and qconfig["quantized_embeddings"]
        and qconfig["linear8bit"]
    )
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.model.embed_tokens, Embedding4bit)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, Linear8bit)
    assert torch.equal(_logits(loaded), _logits(model))
    # transformers skips an unknown quant_method (with a warning) and then fails on the packed
    # shapes: an error, never a silently misread model.
    with pytest.raises(Exception, match="mismatch"):
        _hf_load(tmp_path)


def test_plain_module_with_factory(tmp_path: Path) -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))

    model = factory()
    model[0] = Linear4bit.from_linear(model[0])
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, model_class=factory)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------- errors
def test_load_errors_name_the_problem(ours, tmp_path: Path) -> None:
    _, path = ours
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "quantization_config"})
    )
    with pytest.raises(FormatError, match="field 'quantization_config' is missing"):
        load_quantized(bad)
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(
        FormatError,
        match=r"mlp\.down_proj\.weight' has shape \(64, 128\) but the model expects \(64, 256\)",
    ):
        load_quantized(bad)
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"model\.safetensors is not a readable safetensors file"):
        load_quantized(bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError, match="pickle file"):
        load_quantized(bad)
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(tiny_llama(), tmp_path / "dense")


# ---------------------------------------------------------------------------------- transformers
@needs("bitsandbytes")
def test_keys_and_codes_match_transformers(bnb_llama_checkpoint, tmp_path: Path) -> None:
    """transformers + bnb quantizing the same dense weights writes the same keys and nibbles."""
    _, hf_path, _ = bnb_llama_checkpoint
    torch.manual_seed(0)  # the checkpoint's dense weights
    ours_path = save_quantized(quantize_base(tiny_llama(hidden=64)), tmp_path / "ours")
    with (
        safe_open(str(ours_path / "model.safetensors"), "pt") as a,
        safe_open(str(hf_path / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        assert a.metadata() == b.metadata() == {"format": "pt"}
        for key in a.keys():
            sa, sb = a.get_slice(key), b.get_slice(key)
            assert sa.get_dtype() == sb.get_dtype(), key
            if ".quant_state." not in key:  # the JSON's nested_offset digits vary in length
                assert sa.get_shape() == sb.get_shape(), key
            if key.endswith(".weight") and sa.get_dtype() == "U8":
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key  # same NF4 nibbles
    ours_q = json.loads((ours_path / "config.json").read_text())["quantization_config"]
    hf_q = json.loads((hf_path / "config.json").read_text())["quantization_config"]
    assert ours_q == hf_q


@needs("bitsandbytes")
def test_transformers_loads_ours(ours) -> None:
    import bitsandbytes.functional as bnbf

    model, path = ours
    hf = _hf_load(path)
    q_proj = hf.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("bitsandbytes")
    theirs = bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    assert torch.equal(theirs, model.model.layers[0].self_attn.q_proj.dequantize_weight())
    assert (_logits(hf, train=True) - _logits(model)).abs().max() < 1e-5


@needs("bitsandbytes")
def test_transformers_keeps_a_classifier_head_dense(tmp_path: Path) -> None:
    """transformers' default skip list holds only the output embeddings, so a classifier head
    that stayed dense must be listed, or transformers builds a 4-bit layer for its float weight."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = quantize_base(tiny_bert_cls(hidden=64)).eval()
    save_quantized(model, tmp_path)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["llm_int8_skip_modules"] == ["classifier"]
    hf = _quiet(AutoModelForSequenceClassification.from_pretrained, str(tmp_path), device_map="cpu")
    assert type(hf.classifier) is nn.Linear
    assert type(hf.bert.pooler.dense).__module__.startswith("bitsandbytes")
    assert (_logits(hf, train=True) - _logits(model)).abs().max() < 1e-5


@needs("bitsandbytes")
def test_we_load_transformers_checkpoint(bnb_llama_checkpoint) -> None:
    _, hf_path, hf = bnb_llama_checkpoint
    ours = load_quantized(hf_path)
    assert isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    with safe_open(str(hf_path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(ours.model.layers[1].mlp.down_proj.qweight.packed, stored)
    assert (_logits(ours) - _logits(hf, train=True)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------- QLoRA
@needs("bitsandbytes")
def test_qlora_adapter_loraq_to_peft_and_back(ours, tmp_path: Path) -> None:
    """A LoRA adapter over the NF4 base: PEFT on transformers' bnb model of the same bytes gives
    the same logits, and PEFT's own QLoRA adapter loads into loraq."""
    peft = pytest.importorskip("peft")
    model, path = ours
    config = loraq.LoraConfig(r=4, alpha=8, targets="all-linear")
    ours_q = loraq.apply(load_quantized(path), config)
    _randomize(ours_q)
    expected = _logits(ours_q)
    save_adapter(ours_q, tmp_path / "ours")
    theirs = _quiet(peft.PeftModel.from_pretrained, _hf_load(path), str(tmp_path / "ours"))
    assert (
        type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__
        == "peft.tuners.lora.bnb"
    )
    assert (_logits(theirs, train=True) - expected).abs().max() < 1e-5

    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = _quiet(peft.get_peft_model, _hf_load(path), peft_cfg)
    _randomize(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = load_adapter(load_quantized(path), tmp_path / "theirs")
    assert (_logits(loaded) - _logits(theirs, train=True)).abs().max() < 1e-5


def test_export_merged_quantized_gpt2_restores_conv1d(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers are quantized as Linear (out, in); the export must write them back
    in Conv1D's (in, out) layout, or square c_proj weights would load transposed."""
    from transformers import AutoModelForCausalLM

    model = loraq.apply(
        tiny_gpt2(hidden=64), loraq.LoraConfig(r=4, targets="all-linear", quant="nf4")
    )
    _randomize(model)
    expected = _logits(model)
    export_merged(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(dense.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert (_logits(dense) - expected).abs().max() < 1e-5


def test_export_merged_dequantizes(ours, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = ours
    adapted = loraq.apply(
        copy.deepcopy(model), loraq.LoraConfig(r=4, targets="all-linear", use_dora=True)
    )
    _randomize(adapted)
    expected = _logits(adapted)
    export_merged(adapted, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(dense.model.layers[0].self_attn.q_proj, nn.Linear)
    assert (_logits(dense) - expected).abs().max() < 1e-5
    assert isinstance(adapted.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)  # untouched


@needs("bitsandbytes")
@pytest.mark.parametrize(
    "factory", [lambda: tiny_llama(hidden=64), lambda: tiny_gpt2(hidden=64)], ids=["llama", "gpt2"]
)
def test_qlora_via_apply_saves_base_and_adapter(factory, tmp_path: Path) -> None:
    """The whole QLoRA flow: apply(quant='nf4') -> save base + adapter -> load both elsewhere;
    transformers + bnb (+ PEFT) read the same two folders."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = loraq.apply(
        factory(), loraq.LoraConfig(r=4, alpha=8, targets="all-linear", quant="nf4")
    )
    _randomize(model)
    expected = _logits(model)
    save_quantized(model, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(load_quantized(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(_logits(again), expected)
    # Or from the dense base: re-quantizing it is deterministic, so the same NF4 bytes.
    torch.manual_seed(0)
    rebuilt = load_adapter(factory(), tmp_path / "adapter", quant="nf4")
    assert torch.equal(_logits(rebuilt), expected)
    hf = _hf_load(tmp_path / "base")
    if hasattr(hf, "transformer"):
        assert hf.lm_head.weight is hf.transformer.wte.weight  # tied weights stay tied
        assert again.lm_head.weight is again.transformer.wte.weight
    theirs = _quiet(peft.PeftModel.from_pretrained, hf, str(tmp_path / "adapter"))
    assert (_logits(theirs, train=True) - expected).abs().max() < 1e-5


def test_load_with_auto_class(ours) -> None:
    from transformers import AutoModelForCausalLM

    model, path = ours
    loaded = load_quantized(path, model_class=AutoModelForCausalLM)
    assert torch.equal(_logits(loaded), _logits(model))


class _Encoder(nn.Module):
    """Module names with ``base_layers`` in them, which a substring strip would mangle."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.base_layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.base_layers:
            x = layer(x)
        return x


def test_wrapper_segments_are_stripped_whole(tmp_path: Path) -> None:
    config = loraq.LoraConfig(r=2, targets=["0"], quant="nf4", quant_skip=["base_layers.1"])
    model = loraq.apply(_Encoder(), config)
    assert isinstance(model.encoder.base_layers[0].base_layer, Linear4bit)
    save_quantized(model, tmp_path)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["llm_int8_skip_modules"] == ["encoder.base_layers.1"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.base_layers.0.weight.absmax" in keys and "encoder.base_layers.1.weight" in keys
    loaded = load_quantized(tmp_path, _Encoder)
    x = torch.randn(3, 64)
    with loraq.disable_adapters(model), torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_gpt2_dense_unload_of_a_loaded_checkpoint_reloads_in_transformers(tmp_path: Path) -> None:
    """save_quantized -> load_quantized -> unload(dense=True) -> save_pretrained -> from_pretrained:
    the quantized layers remember they stand for Conv1D, so the dense model has Conv1D layers in
    transformers' (in, out) layout and the reload (square attn.c_proj included) gives the same
    logits."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = loraq.apply(tiny_gpt2(hidden=64), loraq.LoraConfig(r=4, quant="nf4"))
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert loaded.transformer.h[0].attn.c_proj.dense_layout == "conv1d"
    loraq.apply(loaded, loraq.LoraConfig(r=4))
    _randomize(loaded)
    expected = _logits(loaded)
    dense = loraq.unload(loaded, dense=True)
    assert type(dense.transformer.h[0].attn.c_proj) is Conv1D
    assert type(dense.transformer.h[0].mlp.c_fc) is Conv1D
    assert (_logits(dense) - expected).abs().max() < 1e-5
    dense.save_pretrained(tmp_path / "dense")
    again = _quiet(GPT2LMHeadModel.from_pretrained, str(tmp_path / "dense"))
    assert torch.equal(_logits(again), _logits(dense))
