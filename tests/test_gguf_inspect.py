"""``loraq inspect FILE.gguf``: architecture, tensor types with counts and bytes, an adapter's
targets and alpha, and whether llama.cpp can load the file (with the reason when not)."""

from __future__ import annotations

import copy
import json

import pytest

import loraq
from loraq.cli import main
from loraq.io.gguf_write import export_gguf
from loraq.io.inspect import format_inspection, inspect_path
from tiny_lm import byte_tokenizer, single_thread  # noqa: F401

pytest.importorskip("gguf")
from conftest import tiny_llama  # noqa: E402
from gguf_tokenizers import byte_level_folder  # noqa: E402


def test_merged_model_with_and_without_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_llama()
    tokenizer = AutoTokenizer.from_pretrained(byte_level_folder(tmp_path / "tok", "llama3"))
    model.resize_token_embeddings(len(tokenizer))
    path = export_gguf(model, tmp_path / "m.gguf", merged=True, dtype="q8_0", tokenizer=tokenizer)
    info = inspect_path(path)
    assert info["kind"] == "gguf" and info["architecture"] == "llama"
    assert info["gguf_type"] == "model"
    types = info["tensor_types"]
    assert set(types) == {"Q8_0", "F32"}
    assert sum(t["tensors"] for t in types.values()) == info["tensors"]
    assert types["Q8_0"]["bytes"] == types["Q8_0"]["params"] // 32 * 34  # 34 bytes per block
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["pre"] == "llama-bpe"
    assert info["llamacpp_loadable"], info["llamacpp_problems"]
    text = format_inspection(info)
    assert "architecture llama" in text and "Q8_0" in text and "llama.cpp: loads" in text

    with pytest.warns(UserWarning):
        bare = export_gguf(tiny_llama(), tmp_path / "bare.gguf", merged=True, dtype="f32")
    info = inspect_path(bare)
    assert not info["llamacpp_loadable"]
    assert "tokenizer.ggml.model" in info["llamacpp_problems"][0]
    assert "will NOT load" in format_inspection(info)


def test_adapter_targets_rank_and_alpha(tmp_path, capsys):
    model = copy.deepcopy(tiny_llama())
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj", "lm_head"]))
    path = export_gguf(model, tmp_path / "a.gguf")
    info = inspect_path(path)
    adapter = info["adapter"]
    assert info["gguf_type"] == "adapter" and adapter["alpha"] == 8.0 and adapter["ranks"] == [4]
    layers = model.config.num_hidden_layers
    assert adapter["targets"] == {
        "attn_q (q_proj)": layers,
        "ffn_down (down_proj)": layers,
        "output (lm_head)": 1,
    }
    assert info["llamacpp_loadable"]
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["alpha"] == 8.0
    assert main(["inspect", str(path)]) == 0
    assert "alpha 8.0" in capsys.readouterr().out


def test_not_a_gguf_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraq inspect: error:") and "x.gguf" in err and "\n" not in err
