"""A byte-level GGUF vocabulary's tokenizer is built from the file's metadata
(:mod:`loraq.io.gguf_byte_level`), without transformers' GGUF parse: it tokenizes, decodes and
templates as the original tokenizer did (SmolLM's single digits included, which transformers'
reader splits differently), equals transformers' conversion elsewhere, and llama.cpp's
tokenization in the ``llamacpp`` group. Other vocabularies still go through transformers."""

from __future__ import annotations

import json

import pytest

from gguf_tokenizers import byte_level_folder, sample_strings, sentencepiece_folder
from loraq.io.gguf_byte_level import VOCABULARY_ARRAYS, byte_level_tokenizer
from loraq.io.gguf_header import check_gguf_layout
from loraq.io.gguf_read import load_gguf, load_gguf_tokenizer
from loraq.io.gguf_write import export_gguf
from test_gguf_tokenizer import tiny_model
from test_io_gguf import needs_smollm2, smollm2_file

gguf = pytest.importorskip("gguf")
BYTE_LEVEL_STYLES = ("llama3", "qwen2", "gpt2", "smollm")
MESSAGES = [{"role": "user", "content": "Hi  there 😀 12345"}]


def _export(folder_factory, name: str, build, style: str):
    from transformers import AutoTokenizer

    folder = build(folder_factory.mktemp(name), style)
    original = AutoTokenizer.from_pretrained(folder)
    model = tiny_model(len(original) + 3, folder)  # padded ids past the vocabulary, as llama.cpp
    out = folder_factory.mktemp(name + "-gguf") / "m.gguf"
    return original, export_gguf(model, out, merged=True, dtype="f32")


@pytest.fixture(scope="module", params=BYTE_LEVEL_STYLES)
def byte_level(request, tmp_path_factory):
    """(style, original tokenizer, GGUF path)."""
    original, path = _export(tmp_path_factory, request.param, byte_level_folder, request.param)
    return request.param, original, path


@pytest.fixture
def no_transformers_conversion(monkeypatch):
    """Fail any use of transformers' GGUF tokenizer route."""
    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' GGUF conversion was used")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


def test_byte_level_vocabularies_tokenize_as_the_original(byte_level, no_transformers_conversion):
    style, original, path = byte_level
    back = load_gguf_tokenizer(path)
    strings = sample_strings()
    for text in strings:  # no gaps: SmolLM's digits split as the original splits them
        assert back(text)["input_ids"] == original(text)["input_ids"], (style, text)
        ids = original(text)["input_ids"]
        assert back.decode(ids) == original.decode(ids), (style, text)
        skip = back.decode(ids, skip_special_tokens=True)
        assert skip == original.decode(ids, skip_special_tokens=True), (style, text)
    for token in (original.bos_token, original.eos_token, "<|user|>", "<think>"):
        assert back(token, add_special_tokens=False)["input_ids"] == [
            original.convert_tokens_to_ids(token)
        ], token
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back, name) == getattr(original, name), name
    assert back.apply_chat_template(MESSAGES, tokenize=False) == original.apply_chat_template(
        MESSAGES, tokenize=False
    )
    # the model loader hands out the same tokenizer
    _, from_model = load_gguf(path)
    assert from_model("a 12 <think>")["input_ids"] == back("a 12 <think>")["input_ids"]


def test_byte_level_tokenizer_equals_transformers_conversion(byte_level):
    """Beside transformers' own conversion of the same file: the same backend tokenizer, but
    for SmolLM's pre-tokenizer, where transformers' reader drops the single-digit split, and
    for tokens transformers invents past the file's vocabulary (GPT-2's default
    ``<|endoftext|>``, an id the model's embedding does not have)."""
    from transformers import AutoTokenizer

    style, _, path = byte_level
    layout = check_gguf_layout(path, VOCABULARY_ARRAYS)
    n_tokens = len(layout.values["tokenizer.ggml.tokens"])
    ours = byte_level_tokenizer(layout, str(path))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mine, ref = (
        json.loads(ours.backend_tokenizer.to_str()),
        json.loads(theirs.backend_tokenizer.to_str()),
    )
    ref["added_tokens"] = [t for t in ref["added_tokens"] if t["id"] < n_tokens]
    differ = {key for key in ref if mine.get(key) != ref[key]}
    assert differ == ({"pre_tokenizer"} if style == "smollm" else set()), differ
    assert len(ours) == n_tokens
    for text in sample_strings(100):
        if style != "smollm" or not any(c.isdigit() for c in text):
            assert ours(text)["input_ids"] == theirs(text)["input_ids"], (style, text)


def test_other_vocabularies_and_unknown_pre_tokenizers_use_transformers(tmp_path_factory):
    from transformers import AutoTokenizer

    original, path = _export(tmp_path_factory, "spm", sentencepiece_folder, "metaspace")
    layout = check_gguf_layout(path, VOCABULARY_ARRAYS)
    assert byte_level_tokenizer(layout, str(path)) is None  # "llama": SentencePiece
    back = load_gguf_tokenizer(path)
    for text in sample_strings(60):
        if not text.startswith(" "):  # transformers' Metaspace gap (see test_gguf_tokenizer)
            assert back(text)["input_ids"] == original(text)["input_ids"], text
    _, gpt2 = _export(tmp_path_factory, "falcon", byte_level_folder, "gpt2")
    renamed = gpt2.parent / "renamed.gguf"
    from test_gguf_hostile import rewrite

    rewrite(gpt2, renamed, {"tokenizer.ggml.pre": ("falcon", gguf.GGUFValueType.STRING)})
    assert byte_level_tokenizer(check_gguf_layout(renamed, VOCABULARY_ARRAYS), "x") is None
    theirs = AutoTokenizer.from_pretrained(str(renamed.parent), gguf_file=renamed.name)
    assert load_gguf_tokenizer(renamed)("don't 42")["input_ids"] == theirs("don't 42")["input_ids"]


@needs_smollm2
def test_smollm2_tokenizer_equals_transformers_conversion_but_for_digits(
    no_transformers_conversion,
):
    ours = load_gguf_tokenizer(smollm2_file())
    assert ours("12345")["input_ids"] == [ours.convert_tokens_to_ids(d) for d in "12345"]
    assert ours.eos_token == "<|im_end|>" and ours.bos_token == "<|im_start|>"
    assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi  there 😀 12345<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_beside_transformers_conversion():
    """transformers' conversion of the 49k vocabulary (seconds): equal but for digits."""
    from transformers import AutoTokenizer

    path = smollm2_file()
    ours = load_gguf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in sample_strings():
        if not any(c.isdigit() for c in text):
            assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == theirs.apply_chat_template(
        MESSAGES, tokenize=False
    )


@pytest.mark.llamacpp
@needs_smollm2
def test_smollm2_tokenizer_tokenizes_as_llamacpp():
    pytest.importorskip("llama_cpp")
    from llamacpp_open import open_llama

    path = smollm2_file()
    ours = load_gguf_tokenizer(path)
    llm = open_llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in [*sample_strings(), "In 2024, 12345678 people paid $3.14159."]:
        want = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ours(text)["input_ids"] == want, text
