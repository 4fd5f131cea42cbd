"""Adapters trained with adapter_bits=k: saved as int8 codes + row scales, loaded back exactly."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loraq
from conftest import SmallCNN, cnn_inputs, tiny_llama
from loraq.io import FormatError, load_adapter, save_adapter
from loraq.io.adapter_codes import from_codes, to_codes
from loraq.io.inspect import inspect_path

TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(9))
CODES_FILE = "adapter_model.codes.safetensors"


def _randomize(model: nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def _quantized_adapter(bits: int, **kw) -> tuple[nn.Module, nn.Module]:
    base = tiny_llama()
    model = loraq.apply(
        copy.deepcopy(base), loraq.LoraConfig(r=4, alpha=8, adapter_bits=bits, **kw)
    )
    _randomize(model)
    return base, model


@pytest.mark.parametrize(
    ("bits", "targets", "dora"),
    [
        (2, ["q_proj", "embed_tokens"], False),
        (4, ["q_proj", "down_proj"], True),
        (8, ["q_proj", "embed_tokens"], False),
    ],
)
def test_codes_roundtrip_is_exact(bits: int, targets: list, dora: bool, tmp_path: Path) -> None:
    base, model = _quantized_adapter(bits, targets=targets, use_dora=dora)
    expected = _logits(model)
    save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["loraq_adapter_bits"] == bits
    stored = load_file(str(tmp_path / "a" / CODES_FILE))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert (
        stored[key + ".codes"].dtype == torch.int8 and stored[key + ".scale"].dtype == torch.float32
    )
    assert stored[key + ".scale"].shape == (4,)
    assert int(stored[key + ".codes"].abs().max()) == 2 ** (bits - 1) - 1
    if dora:  # magnitudes stay float
        assert (
            stored["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].dtype
            == torch.float32
        )
    else:
        assert "base_model.model.model.embed_tokens.lora_embedding_B.codes" in stored

    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert loraq.config_of(loaded).adapter_bits == bits
    assert torch.equal(_logits(loaded), expected)
    save_adapter(loaded, tmp_path / "b")
    assert (tmp_path / "a" / CODES_FILE).read_bytes() == (tmp_path / "b" / CODES_FILE).read_bytes()


def test_codes_are_smaller_and_inspect_reports_bits(tmp_path: Path) -> None:
    _, model = _quantized_adapter(4, targets="all-linear")
    save_adapter(model, tmp_path / "codes")
    save_adapter(model, tmp_path / "float", dequantize=True)

    floats = load_file(str(tmp_path / "float" / "adapter_model.safetensors"))
    codes = load_file(str(tmp_path / "codes" / CODES_FILE))
    # One byte per weight plus a float32 scale per row, instead of four bytes per weight.
    assert sum(t.numel() * t.element_size() for t in codes.values()) == sum(
        t.numel() + 4 * t.shape[0] for t in floats.values()
    )
    info = inspect_path(tmp_path / "codes")["adapters"][0]
    assert info["adapter_bits"] == 4 and info["weights_file"] == CODES_FILE
    assert info["lora_params"] == inspect_path(tmp_path / "float")["adapters"][0]["lora_params"]


def test_dequantized_file_is_plain_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, model = _quantized_adapter(3, targets="all-linear")
    expected = _logits(model)
    save_adapter(model, tmp_path / "plain", dequantize=True)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert "loraq_adapter_bits" not in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))
    assert (_logits(theirs) - expected).abs().max() < 1e-5
    again = load_adapter(copy.deepcopy(base), tmp_path / "plain")
    assert (_logits(again) - expected).abs().max() < 1e-5
    # The codes file is not PEFT's: PEFT fails loudly instead of loading random adapters.
    save_adapter(model, tmp_path / "codes")
    with pytest.raises(ValueError, match="Can't find weights|Repo id"):  # then tries the Hub
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "codes"))


def test_conv_adapter_codes(tmp_path: Path) -> None:
    base = SmallCNN().eval()
    model = loraq.apply(
        copy.deepcopy(base),
        loraq.LoraConfig(r=2, targets=["conv1", "conv2", "head"], adapter_bits=4),
    )
    _randomize(model)
    inputs = cnn_inputs()
    with torch.no_grad():
        expected = model(*inputs)
    save_adapter(model, tmp_path)
    loaded = load_adapter(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), expected)


def test_grid_values_requantize_to_the_same_codes_and_scales() -> None:
    """codes * scale is a fixed point of the forward pass's quantizer for the scales it makes,
    over many magnitudes and every bit width: why loading codes is exact."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(700):
        bits = 2 + trial % 7
        magnitude = 10.0 ** (torch.rand(1, generator=gen).item() * 8 - 5)
        weight = torch.randn(16, 33, generator=gen) * magnitude
        codes, scale = to_codes(weight, bits)
        again_codes, again_scale = to_codes(from_codes(codes, scale), bits)
        assert torch.equal(again_codes, codes) and torch.equal(again_scale, scale)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, k: t.pop(k + ".scale"), r"has no matching '.*lora_A\.weight\.scale'"),
        (lambda t, k: t.__setitem__(k + ".codes", t[k + ".codes"].to(torch.int16)), "must be int8"),
        (
            lambda t, k: t.__setitem__(k + ".scale", torch.ones(3)),
            r"has shape \(3,\) but the codes need \(4,\)",
        ),
        (
            lambda t, k: t.__setitem__(k + ".codes", t[k + ".codes"] * 0 + 100),
            "outside the 4-bit grid",
        ),
        (
            lambda t, k: t.__setitem__(k, torch.zeros(4, 32)),
            r"should be stored as \.codes \+ \.scale",
        ),
    ],
)
def test_bad_codes_name_the_key(edit, message: str, tmp_path: Path) -> None:
    _, model = _quantized_adapter(4, targets=["q_proj"])
    save_adapter(model, tmp_path)
    path = tmp_path / CODES_FILE
    tensors = load_file(str(path))
    edit(tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=message):
        load_adapter(tiny_llama(), tmp_path)


def test_switching_format_removes_the_stale_weights_file(tmp_path: Path) -> None:
    _, model = _quantized_adapter(4, targets=["q_proj"])
    save_adapter(model, tmp_path, dequantize=True)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        CODES_FILE,
    ]
    save_adapter(model, tmp_path, dequantize=True)
    assert not (tmp_path / CODES_FILE).exists()
