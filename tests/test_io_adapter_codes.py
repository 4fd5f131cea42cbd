"""Adapters trained with adapter_bits=k: saved as integer codes (two per byte for k <= 4) + row
scales, loaded back exactly."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loraq
from conftest import SmallCNN, cnn_inputs, eval_logits, randomize_trainable, tiny_llama
from loraq.io import FormatError, load_adapter, save_adapter
from loraq.io.adapter_codes import pack_codes, unpack_codes
from loraq.io.inspect import inspect_path
from loraq.layers.adapter_quant import dequantize_codes, quantize_codes

TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(9))
CODES_FILE = "adapter_model.codes.safetensors"


def _quantized_adapter(bits: int, r: int = 4, vocab: int = 64, **kw) -> tuple[nn.Module, nn.Module]:
    base = tiny_llama(vocab=vocab)
    model = loraq.apply(
        copy.deepcopy(base), loraq.LoraConfig(r=r, alpha=8, adapter_bits=bits, **kw)
    )
    randomize_trainable(model)
    return base, model


@pytest.mark.parametrize(
    ("bits", "targets", "dora", "r", "vocab"),
    [
        (2, ["q_proj", "embed_tokens"], False, 4, 64),
        # Odd widths: lora_B (32, 3) of q_proj and down_proj, lora_embedding_A (3, 65).
        (3, ["q_proj", "down_proj", "embed_tokens"], False, 3, 65),
        (4, ["q_proj", "down_proj"], True, 4, 64),
        (8, ["q_proj", "embed_tokens"], False, 4, 64),
    ],
)
def test_codes_roundtrip_is_exact(
    bits: int, targets: list, dora: bool, r: int, vocab: int, tmp_path: Path
) -> None:
    base, model = _quantized_adapter(bits, r=r, vocab=vocab, targets=targets, use_dora=dora)
    expected = eval_logits(model, TOKENS)
    save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["loraq_adapter_bits"] == bits
    stored = load_file(str(tmp_path / "a" / CODES_FILE))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # (r, 32)
    codes, scale = stored[key + ".codes"], stored[key + ".scale"]
    assert scale.dtype == torch.float32 and scale.shape == (r,)
    if bits <= 4:  # two codes per byte, packed along dim 1
        assert codes.dtype == torch.uint8 and codes.shape == (r, 16)
        b_codes = stored[key.replace("lora_A", "lora_B") + ".codes"]  # (32, r)
        assert b_codes.dtype == torch.uint8 and b_codes.shape == (32, (r + 1) // 2)
        codes = unpack_codes(codes, bits)
    else:
        assert codes.dtype == torch.int8 and codes.shape == (r, 32)
    assert int(codes.abs().max()) == 2 ** (bits - 1) - 1
    if "embed_tokens" in targets:
        emb = stored["base_model.model.model.embed_tokens.lora_embedding_A.codes"]
        assert emb.shape == ((r, (vocab + 1) // 2) if bits <= 4 else (r, vocab))
    if dora:  # magnitudes stay float
        assert (
            stored["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].dtype
            == torch.float32
        )
    else:
        assert "base_model.model.model.embed_tokens.lora_embedding_B.codes" in stored

    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert loraq.config_of(loaded).adapter_bits == bits
    assert torch.equal(eval_logits(loaded, TOKENS), expected)
    save_adapter(loaded, tmp_path / "b")
    assert (tmp_path / "a" / CODES_FILE).read_bytes() == (tmp_path / "b" / CODES_FILE).read_bytes()


@pytest.mark.parametrize(("bits", "per_row"), [(4, lambda w: (w + 1) // 2), (8, lambda w: w)])
def test_codes_are_smaller_and_inspect_reports_bits(bits: int, per_row, tmp_path: Path) -> None:
    _, model = _quantized_adapter(bits, targets="all-linear")
    save_adapter(model, tmp_path / "codes")
    save_adapter(model, tmp_path / "float", dequantize=True)

    floats = load_file(str(tmp_path / "float" / "adapter_model.safetensors"))
    codes = load_file(str(tmp_path / "codes" / CODES_FILE))
    # Half a byte (4-bit) or one byte (8-bit) per weight, rows padded to whole bytes, plus a
    # float32 scale per row, instead of four bytes per weight.
    assert sum(t.numel() * t.element_size() for t in codes.values()) == sum(
        t.shape[0] * per_row(t.shape[1]) + 4 * t.shape[0] for t in floats.values()
    )
    info = inspect_path(tmp_path / "codes")["adapters"][0]
    assert info["adapter_bits"] == bits and info["weights_file"] == CODES_FILE
    assert info["lora_params"] == inspect_path(tmp_path / "float")["adapters"][0]["lora_params"]


def test_inspect_counts_the_parameters_of_packed_codes(tmp_path: Path) -> None:
    _, model = _quantized_adapter(4, targets="all-linear")
    save_adapter(model, tmp_path / "codes")
    save_adapter(model, tmp_path / "float", dequantize=True)
    info = inspect_path(tmp_path / "codes")["adapters"][0]
    assert info["lora_params"] == inspect_path(tmp_path / "float")["adapters"][0]["lora_params"]


def test_4bit_file_is_about_a_fifth_of_the_float_one(tmp_path: Path) -> None:
    """Rank 8 over 256-wide layers (the shapes of real adapters, not the toy ones above): each
    lora_A costs 1/2 + 4/256 bytes per weight, each lora_B 1/2 + 4/8 (its float32 row scale
    weighs as much as its 8 codes), against 4 bytes per float32 weight; plus the headers."""
    base = tiny_llama(hidden=256, layers=1)
    model = loraq.apply(base, loraq.LoraConfig(r=8, targets="all-linear", adapter_bits=4))
    randomize_trainable(model)
    save_adapter(model, tmp_path / "codes")
    save_adapter(model, tmp_path / "float", dequantize=True)
    floats = load_file(str(tmp_path / "float" / "adapter_model.safetensors"))
    codes = load_file(str(tmp_path / "codes" / CODES_FILE))
    payload = sum(t.numel() * t.element_size() for t in codes.values())
    float_payload = sum(t.numel() * t.element_size() for t in floats.values())
    a_bytes = sum(t.numel() * (0.5 + 4 / t.shape[1]) for k, t in floats.items() if "lora_A" in k)
    b_bytes = sum(t.numel() * (0.5 + 4 / 8) for k, t in floats.items() if "lora_B" in k)
    assert payload == a_bytes + b_bytes
    assert 0.189 < payload / float_payload < 0.190  # 24800 / 131072
    ratio = (tmp_path / "codes" / CODES_FILE).stat().st_size / (
        tmp_path / "float" / "adapter_model.safetensors"
    ).stat().st_size
    assert 0.21 < ratio < 0.22  # 28400 / 132864: twice the header (a .codes and a .scale key)


def test_dequantized_file_is_plain_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, model = _quantized_adapter(3, targets="all-linear")
    expected = eval_logits(model, TOKENS)
    save_adapter(model, tmp_path / "plain", dequantize=True)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert "loraq_adapter_bits" not in config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain"))
    assert (eval_logits(theirs, TOKENS) - expected).abs().max() < 1e-5
    again = load_adapter(copy.deepcopy(base), tmp_path / "plain")
    assert (eval_logits(again, TOKENS) - expected).abs().max() < 1e-5
    # The codes file is not PEFT's: PEFT fails loudly instead of loading random adapters.
    save_adapter(model, tmp_path / "codes")
    with pytest.raises(ValueError, match="Can't find weights|Repo id"):  # then tries the Hub
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "codes"))


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_conv_adapter_codes(bits: int, tmp_path: Path) -> None:
    base = SmallCNN().eval()
    model = loraq.apply(
        copy.deepcopy(base),
        loraq.LoraConfig(r=2, targets=["conv1", "conv2", "head"], adapter_bits=bits),
    )
    randomize_trainable(model)
    inputs = cnn_inputs()
    with torch.no_grad():
        expected = model(*inputs)
    save_adapter(model, tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / CODES_FILE))
    conv2_a = stored["base_model.model.conv2.lora_A.weight.codes"]  # weight (2, 1, 3, 3)
    assert conv2_a.shape == (2, 1, 3, 3)  # dim 1 of 1: one byte (packed: low nibble is padding)
    assert conv2_a.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert stored["base_model.model.conv1.lora_A.weight.codes"].shape == (
        (2, 4, 3) if bits <= 4 else (2, 8, 3)
    )
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), expected)
    save_adapter(loaded, tmp_path / "b")
    assert (tmp_path / "a" / CODES_FILE).read_bytes() == (tmp_path / "b" / CODES_FILE).read_bytes()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "shape", [(1, 1), (5, 1), (5, 2), (4, 7), (3, 8), (7, 5, 1), (4, 1, 3, 3), (6, 3, 3, 3)]
)
def test_pack_codes_roundtrip(bits: int, shape: tuple) -> None:
    qmax = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(math.prod(shape) * bits)
    codes = torch.randint(-qmax, qmax + 1, shape, generator=gen).to(torch.int8)
    codes.view(-1)[:2] = torch.tensor([-qmax, qmax][: codes.numel()], dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], (shape[1] + 1) // 2, *shape[2:])
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_codes_layout() -> None:
    """code + 2^(k-1) as a nibble, first of each pair high, an odd width padded with nibble 0."""
    codes = torch.tensor([[-7, 7, 0], [1, -1, 3]], dtype=torch.int8)
    assert pack_codes(codes, 4).tolist() == [[0x1F, 0x80], [0x97, 0xB0]]
    assert pack_codes(torch.tensor([[-1, 1, 0]], dtype=torch.int8), 2).tolist() == [[0x13, 0x20]]
    assert pack_codes(torch.tensor([[-3, 3]], dtype=torch.int8), 3).tolist() == [[0x17]]
    with pytest.raises(ValueError, match="outside the 2-bit grid"):
        pack_codes(torch.tensor([[2, 0]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="only codes of 2..4 bits"):
        pack_codes(codes, 5)


def test_grid_values_requantize_to_the_same_codes_and_scales() -> None:
    """codes * scale is a fixed point of the forward pass's quantizer for the scales it makes,
    over many magnitudes and every bit width: why loading codes is exact."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(700):
        bits = 2 + trial % 7
        magnitude = 10.0 ** (torch.rand(1, generator=gen).item() * 8 - 5)
        weight = torch.randn(16, 33, generator=gen) * magnitude
        codes, scale = quantize_codes(weight, bits)
        again_codes, again_scale = quantize_codes(dequantize_codes(codes, scale), bits)
        assert torch.equal(again_codes, codes) and torch.equal(again_scale, scale)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, k: t.pop(k + ".scale"), r"has no matching '.*lora_A\.weight\.scale'"),
        (
            lambda t, k: t.__setitem__(k + ".codes", t[k + ".codes"].view(torch.int8)),
            r"'.*lora_A\.weight\.codes' must be uint8 \(two 4-bit codes per byte\), found torch.int8",
        ),
        (
            lambda t, k: t.__setitem__(k + ".scale", t[k + ".scale"].half()),
            r"'.*lora_A\.weight\.scale' must be float32, found torch.float16",
        ),
        (
            lambda t, k: t.__setitem__(k + ".scale", torch.ones(3)),
            r"has shape \(3,\) but the codes need \(4,\)",
        ),
        (  # high nibble 0: below the grid
            lambda t, k: t[k + ".codes"][1].__setitem__(0, 0x08),
            r"'.*lora_A\.weight\.codes' holds codes outside the 4-bit grid ±7",
        ),
        (  # padding (low nibble 0 in the last column) in one row only
            lambda t, k: t[k + ".codes"][2].__setitem__(-1, t[k + ".codes"][2, -1] & 0xF0),
            r"'.*lora_A\.weight\.codes' has padding \(nibble 0\) in only some",
        ),
        (  # a whole padded column: the codes are one narrower than the model's weight
            lambda t, k: t[k + ".codes"][:, -1].__iand__(0xF0),
            r"'.*lora_A\.weight' has shape \(4, 31\) but the model expects \(4, 32\)",
        ),
        (
            lambda t, k: t.__setitem__(k + ".codes", t[k + ".codes"][:, :-1].contiguous()),
            r"'.*lora_A\.weight' has shape \(4, 30\) but the model expects \(4, 32\)",
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


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t, k: t.__setitem__(k + ".codes", t[k + ".codes"].view(torch.uint8)),
            "must be int8, found torch.uint8",
        ),
        (  # -128 fits int8 but not the symmetric grid (and int8 abs(-128) is -128)
            lambda t, k: t[k + ".codes"].view(-1).__setitem__(0, -128),
            "holds codes outside the 8-bit grid ±127",
        ),
    ],
)
def test_bad_8bit_codes_name_the_key(edit, message: str, tmp_path: Path) -> None:
    _, model = _quantized_adapter(8, targets=["q_proj"])
    save_adapter(model, tmp_path)
    path = tmp_path / CODES_FILE
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit(tensors, key)
    save_file(tensors, str(path))
    with pytest.raises(FormatError, match=re.escape(repr(key + ".codes")) + " " + message):
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
