"""export_merged: a dense folder transformers loads, with the same outputs as the adapted model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import loraq
from conftest import (
    SmallCNN,
    assert_close_in,
    cnn_inputs,
    eval_logits,
    minilm_path,
    randomize_trainable,
    tiny_gpt2,
    tiny_llama,
)
from loraq.io.merged_export import export_merged

TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("factory", "config"),
    [
        (
            tiny_llama,
            loraq.LoraConfig(r=4, targets="all-linear", use_dora=True, modules_to_save=["lm_head"]),
        ),
        (tiny_llama, loraq.LoraConfig(r=4, targets=["embed_tokens", "q_proj"], use_rslora=True)),
        (tiny_gpt2, loraq.LoraConfig(r=4, targets="all-linear")),
    ],
    ids=["llama-dora-saved-head", "llama-embedding-rslora", "gpt2-conv1d-tied"],
)
def test_export_float32_loads_with_transformers(factory, config, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = loraq.apply(factory(), config)
    randomize_trainable(model)
    expected = eval_logits(model, TOKENS)
    export_merged(model, tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # merged W + BA vs W x + B(A x): float32 roundings through 2 layers of width <= 64
    assert_close_in(eval_logits(loaded, TOKENS), expected, torch.float32, 64, depth=2)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not any("lora" in k or "modules_to_save" in k for k in f.keys())
    # The user's model is untouched: still wrapped, not merged, same outputs.
    assert any(isinstance(m, loraq.LoRALayer) for m in model.modules())
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, loraq.LoRALayer))
    assert torch.equal(eval_logits(model, TOKENS), expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_half_precision(dtype: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, targets="all-linear"))
    randomize_trainable(model)
    export_merged(model, tmp_path, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {
        torch_dtype
    }
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.dtype == torch_dtype
    # The weights are those of merging in float32 and rounding once ...
    reference = loraq.unload(copy.deepcopy(model)).to(torch_dtype).state_dict()
    for key, tensor in load_file(str(tmp_path / "model.safetensors")).items():
        assert torch.equal(tensor, reference[key]), key
    # ... so the outputs match the float32 adapted model up to half-precision rounding.
    assert (eval_logits(loaded, TOKENS).float() - eval_logits(model, TOKENS)).abs().max() < 0.05


def test_export_real_minilm_copies_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_path())
    loraq.apply(model, loraq.LoraConfig(r=8, targets=["query", "value"]))
    randomize_trainable(model, 0.02)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = tokenizer(["loraq exports merged models", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).last_hidden_state
    export_merged(model, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= names
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    with torch.no_grad():
        got = loaded.eval()(**batch).last_hidden_state
    # float32 roundings (merged vs separate, and each CPU's own kernels) through 6 layers of 384
    assert_close_in(got, expected, torch.float32, 384, depth=6)


def test_export_plain_module_writes_state_dict(tmp_path: Path) -> None:
    model = loraq.apply(
        SmallCNN().eval(), loraq.LoraConfig(r=2, targets=["emb", "conv1", "conv2", "head"])
    )
    randomize_trainable(model)
    inputs = cnn_inputs()
    with torch.no_grad():
        expected = model(*inputs)
    export_merged(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    fresh = SmallCNN().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        assert_close_in(fresh(*inputs), expected, torch.float32, 22, depth=2)


def test_export_rejects_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dtype='int8' is invalid"):
        export_merged(tiny_llama(), tmp_path, dtype="int8")
