"""Merged GGUF exports carry the tokenizer of the base folder: transformers' GGUF loader (and
llama.cpp, in the ``llamacpp`` group) tokenizes like the original tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_tokenizers import byte_level_folder, sample_strings, sentencepiece_folder
from loraq.io.gguf_read import open_gguf
from loraq.io.gguf_tokenizer import gguf_vocabulary
from loraq.io.gguf_write import export_gguf
from loraq.io.safe import FormatError

STYLES = {
    "llama3": (byte_level_folder, "llama3", "gpt2", "llama-bpe"),
    "qwen2": (byte_level_folder, "qwen2", "gpt2", "qwen2"),
    "gpt2": (byte_level_folder, "gpt2", "gpt2", "gpt-2"),
    "smollm": (byte_level_folder, "smollm", "gpt2", "smollm"),
    "spm-prepend": (sentencepiece_folder, "prepend", "llama", None),
    "spm-metaspace": (sentencepiece_folder, "metaspace", "llama", None),
}

# Where transformers' GGUF *reader* cannot rebuild the original (the file is right for llama.cpp):
# it has no "smollm" split (single digits), and it prefixes "▁" with Metaspace, which adds none
# to a text already starting with a space, where SentencePiece (and llama.cpp) add one.
READER_GAPS = {
    "smollm": lambda text: any(c.isdigit() for c in text),
    "spm-prepend": lambda text: text.startswith(" "),
}
# llama.cpp always prefixes a space (SentencePiece's way), where Metaspace adds none to a text
# already starting with one: no file can make it tokenize those as such a tokenizer does.
LLAMACPP_GAPS = {"spm-metaspace": lambda text: text.startswith(" ")}


def tiny_model(vocab_size: int, folder: Path):
    """A random 1-layer Llama whose config names ``folder`` (where its tokenizer is)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    model.config._name_or_path = str(folder)
    return model


@pytest.fixture(scope="module", params=sorted(STYLES))
def exported(request, tmp_path_factory):
    """(style, original tokenizer, GGUF path) for each tokenizer style."""
    from transformers import AutoTokenizer

    build, style, _, _ = STYLES[request.param]
    folder = build(tmp_path_factory.mktemp(request.param), style)
    original = AutoTokenizer.from_pretrained(folder)
    model = tiny_model(len(original) + 3, folder)  # 3 rows past the vocabulary: padded ids
    # a folder of its own: next to tokenizer files, transformers would read those instead
    out = tmp_path_factory.mktemp(request.param + "-gguf") / "m.gguf"
    path = export_gguf(model, out, merged=True, dtype="f32")
    return request.param, original, path


def test_gguf_tokenizer_tokenizes_like_the_original(exported):
    from transformers import AutoTokenizer

    name, original, path = exported
    back = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gap = READER_GAPS.get(name, lambda text: False)
    strings = [text for text in sample_strings() if not gap(text)]
    assert len(strings) >= 150
    for text in strings:
        want = original(text)["input_ids"]
        assert back(text)["input_ids"] == want, (name, text)
    # specials stay whole (one id each), and the chat template survives
    for token in (original.bos_token, original.eos_token, "<|user|>"):
        if token in original.get_vocab():
            assert back(token, add_special_tokens=False)["input_ids"] == [
                original.convert_tokens_to_ids(token)
            ]
    assert back.bos_token == original.bos_token and back.eos_token == original.eos_token
    messages = [{"role": "user", "content": "Hi  there 😀"}]
    assert back.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )


def test_gguf_tokenizer_metadata(exported):
    name, original, path = exported
    _, _, model_kind, pre = STYLES[name]
    fields = open_gguf(path).fields
    get = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    assert get["tokenizer.ggml.model"] == model_kind
    assert get.get("tokenizer.ggml.pre") == pre
    assert len(get["tokenizer.ggml.tokens"]) == len(original) + 3
    assert get["tokenizer.ggml.tokens"][-1] == f"[PAD{len(original) + 2}]"
    assert get["tokenizer.ggml.token_type"][-1] == 5  # UNUSED
    assert get["tokenizer.ggml.bos_token_id"] == original.bos_token_id
    assert get["tokenizer.ggml.eos_token_id"] == original.eos_token_id
    adds_bos = original("a")["input_ids"][0] == original.bos_token_id
    assert get["tokenizer.ggml.add_bos_token"] is adds_bos
    assert get["tokenizer.ggml.add_eos_token"] is False
    types = dict(zip(get["tokenizer.ggml.tokens"], get["tokenizer.ggml.token_type"]))
    assert types[original.eos_token] == 3  # CONTROL
    if model_kind == "llama":
        assert types["<0x41>"] == 6 and types["<unk>"] == 2  # BYTE, UNKNOWN
        assert get["tokenizer.ggml.add_space_prefix"] is True
        scores = dict(zip(get["tokenizer.ggml.tokens"], get["tokenizer.ggml.scores"]))
        first, second = get["tokenizer.ggml.merges"][:2]
        assert scores[first.replace(" ", "")] > scores[second.replace(" ", "")]
    else:
        assert types["<think>"] == 4  # USER_DEFINED
    assert get["tokenizer.chat_template"] == original.chat_template


def test_unknown_pre_tokenizer_and_too_many_ids_are_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    folder = byte_level_folder(tmp_path / "t", "llama3")
    tok = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(FormatError, match="rows"):
        gguf_vocabulary(tok, rows=10)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    with pytest.raises(FormatError, match="no llama.cpp counterpart"):
        gguf_vocabulary(tok)


def test_merged_export_without_a_tokenizer_warns(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.warns(UserWarning, match="llama.cpp refuses"):
        export_gguf(LlamaForCausalLM(cfg), tmp_path / "m.gguf", merged=True, dtype="f32")


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_the_original(exported):
    pytest.importorskip("llama_cpp")
    from llamacpp_open import open_llama

    name, original, path = exported
    llm = open_llama(model_path=str(path), vocab_only=True, verbose=False)
    gap = LLAMACPP_GAPS.get(name, lambda text: False)
    for text in (t for t in sample_strings() if not gap(t)):
        want = original(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == want, (name, text)


def test_cli_merged_export_from_a_transformers_folder_carries_the_tokenizer(tmp_path, capsys):
    """The issue's case: ``loraq export --merged`` over a folder base used to write no
    tokenizer, which llama.cpp refuses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loraq
    from loraq.cli import main
    from loraq.io.gguf_read import load_gguf_tokenizer

    folder = byte_level_folder(tmp_path / "base", "llama3")
    original = AutoTokenizer.from_pretrained(folder)
    tiny_model(len(original), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    loraq.apply(model, loraq.LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    loraq.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    argv = ["export", "--format", "gguf", "--adapter", str(tmp_path / "adapter"), "--merged"]
    assert main([*argv, "--base", str(folder), "--dtype", "f32", "--out", str(out)]) == 0
    capsys.readouterr()
    back = load_gguf_tokenizer(out)
    for text in sample_strings(40):
        assert back(text)["input_ids"] == original(text)["input_ids"], text
    # modules_to_save cannot travel in an adapter GGUF: one line naming it, no file
    saved = AutoModelForCausalLM.from_pretrained(folder)
    loraq.apply(
        saved, loraq.LoraConfig(r=2, alpha=4, targets=["q_proj"], modules_to_save=["lm_head"])
    )
    loraq.save_adapter(saved, tmp_path / "saved")
    bad = tmp_path / "bad.gguf"
    argv = ["export", "--format", "gguf", "--adapter", str(tmp_path / "saved"), "--out", str(bad)]
    assert main([*argv, "--base", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("loraq export: error:")
    assert "lm_head is a modules_to_save" in err and "--merged" in err
    assert not bad.exists()
