"""A GGUF file's byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``) as a transformers
fast tokenizer, built from the metadata alone.

transformers' own route (``AutoTokenizer.from_pretrained(folder, gguf_file=...)``) parses the
whole file with ``gguf.GGUFReader`` to learn the model type first, which takes seconds and
hundreds of megabytes for a 49k-token vocabulary. Here the vocabulary, merges and token types are
read by :func:`~loraq.io.gguf_header.check_gguf_layout` (bounded by the file's size) and handed to
the ``tokenizers`` library directly:

====================  ============================================================================
part                  from the file
====================  ============================================================================
model                 BPE over ``tokenizer.ggml.tokens`` (ids = positions; a token spelled outside
                      GPT-2's byte alphabet is re-spelled byte by byte) and ``tokenizer.ggml.merges``
pre-tokenizer         llama.cpp's meaning of ``tokenizer.ggml.pre``: the split regex of
                      :data:`~loraq.io.gguf_tokenizer.PRE_TOKENIZERS`, GPT-2's split, or SmolLM's
                      (single digits first, as llama.cpp splits them)
added tokens          CONTROL tokens (special, kept whole), USER_DEFINED ones (kept whole)
post-processor        BOS / EOS as ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say
special tokens        ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id``
chat template         ``tokenizer.chat_template``
====================  ============================================================================

Vocabularies of other kinds (SentencePiece ``"llama"``, ``"t5"``, ...) and pre-tokenizer names
loraq does not know return None from :func:`byte_level_tokenizer`, and the caller uses
transformers' conversion. The names are the exporter's (:mod:`loraq.io.gguf_tokenizer`), so a
file loraq writes reads back as the tokenizer it was written from.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from .gguf_header import GGUFLayout
from .gguf_tokenizer import (
    CONTROL,
    GPT2_PRE,
    NO_MERGES_PRE,
    PRE_TOKENIZERS,
    SMOLLM_PRE,
    USER_DEFINED,
)
from .safe import FormatError

__all__ = ["BYTE_LEVEL_MODEL", "VOCABULARY_ARRAYS", "byte_level_tokenizer", "byte_to_unicode"]

#: ``tokenizer.ggml.model`` of a byte-level BPE vocabulary (GPT-2, Llama 3, Qwen, SmolLM).
BYTE_LEVEL_MODEL = "gpt2"
_TOKENS, _MERGES, _TYPES = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
)
#: The metadata arrays the tokenizer is built from: pass them to ``check_gguf_layout``.
VOCABULARY_ARRAYS = (_TOKENS, _MERGES, _TYPES)
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
_SPLIT_REGEX = {name: regex for regex, name in PRE_TOKENIZERS.items()}


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the others are
    moved past 255, so every token is a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def _byte_alphabet() -> frozenset[str]:
    """The characters of :func:`byte_to_unicode`: every token of a byte-level vocabulary."""
    return frozenset(byte_to_unicode().values())


def _pre_tokenizer(name: str) -> Any | None:
    from tokenizers import Regex, pre_tokenizers

    if name in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[name]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in (GPT2_PRE, NO_MERGES_PRE):
        return gpt2
    if name == SMOLLM_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    return None


def _vocabulary(tokens: list[str]) -> dict[str, int]:
    spelling, alphabet = byte_to_unicode(), _byte_alphabet()
    return {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }


def _merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for index, merge in enumerate(merges):
        left, space, right = merge.partition(" ")
        if not space or not left or not right or " " in right:
            raise FormatError(
                f"{source}: metadata key {_MERGES!r} entry {index} ({merge[:40]!r}) is not "
                "'left right'"
            )
        pairs.append((left, right))
    return pairs


def _special(values: dict[str, Any], tokens: list[str], source: str) -> dict[str, str]:
    named = {}
    for name, key in _SPECIAL_IDS.items():
        if key not in values:
            continue
        token_id = values[key]
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise FormatError(
                f"{source}: metadata key {key!r} is {token_id!r}, not a token id below "
                f"{len(tokens)}"
            )
        named[name] = tokens[token_id]
    return named


def _post_processor(special: dict[str, str], vocab: dict[str, int], bos: bool, eos: bool):
    from tokenizers import processors

    first = [special["bos_token"]] if bos and "bos_token" in special else []
    last = [special["eos_token"]] if eos and "eos_token" in special else []
    single = [f"{t}:0" for t in first] + ["$A:0"] + [f"{t}:0" for t in last]
    pair = single + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last]
    ids = [(t, vocab[t]) for t in dict.fromkeys(first + last) if t in vocab]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)


def byte_level_tokenizer(layout: GGUFLayout, source: str) -> Any | None:
    """The transformers fast tokenizer of a byte-level GGUF vocabulary, or None where the file
    holds another kind (or a pre-tokenizer loraq does not know): see the module doc.

    ``layout`` must have been read with ``full_arrays=VOCABULARY_ARRAYS``. Raises FormatError
    naming the key for a malformed merge or a special token id outside the vocabulary.
    """
    values = layout.values
    if values.get("tokenizer.ggml.model") != BYTE_LEVEL_MODEL or _TOKENS not in values:
        return None
    merges = values.get(_MERGES)
    if _MERGES in layout.value_types and layout.value_types[_MERGES] != "array[string]":
        raise FormatError(
            f"{source}: metadata key {_MERGES!r} must be array[string], not "
            f"{layout.value_types[_MERGES]}"
        )
    pre = _pre_tokenizer(values.get("tokenizer.ggml.pre", GPT2_PRE) if merges else NO_MERGES_PRE)
    if pre is None:
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = list(values[_TOKENS])
    vocab = _vocabulary(tokens)
    backend = Tokenizer(
        models.BPE(
            vocab,
            _merges(merges or [], source),
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    types = values.get(_TYPES) or ()
    alphabet = _byte_alphabet()
    # llama.cpp's converter marks a few raw-spelled tokens CONTROL: in a byte-level vocabulary
    # they are unreachable, and adding them would grow the vocabulary past the embedding
    control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    special = _special(values, tokens, source)
    bos, eos = (
        bool(values.get("tokenizer.ggml.add_bos_token")),
        bool(values.get("tokenizer.ggml.add_eos_token")),
    )
    backend.post_processor = _post_processor(special, vocab, bos, eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=values.get("tokenizer.chat_template"),
        add_bos_token=bos,
        add_eos_token=eos,
        clean_up_tokenization_spaces=False,
        **special,
    )
