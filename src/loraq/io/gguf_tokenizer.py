"""A transformers tokenizer as the ``tokenizer.*`` metadata of a GGUF file llama.cpp reads.

llama.cpp refuses a model GGUF without ``tokenizer.ggml.model``; this module writes the
vocabulary of a transformers (fast) tokenizer in llama.cpp's terms:

    tokenizer.ggml.model        "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM) or
                                "llama" (SentencePiece-style BPE over "▁" with byte fallback:
                                Llama 2, Mistral, Gemma, Phi-3)
    tokenizer.ggml.pre          the name of llama.cpp's pre-tokenizer (:data:`PRE_TOKENIZERS`)
    tokenizer.ggml.tokens       one string per id, padded to the embedding's rows with
                                ``[PAD<id>]`` tokens of type UNUSED (as llama.cpp's converter pads)
    tokenizer.ggml.token_type   NORMAL, UNKNOWN, CONTROL (special added tokens), USER_DEFINED
                                (other added tokens), UNUSED, BYTE (``<0xNN>``)
    tokenizer.ggml.scores       "llama" only: llama.cpp merges the adjacent pair whose joined
                                token scores highest, so a merge of rank ``k`` scores ``-k``
    tokenizer.ggml.merges       the BPE merges, ``"left right"``
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token,
    add_space_prefix ("llama"), tokenizer.chat_template[.<name>]

``add_bos``/``add_eos`` are what the tokenizer actually does to a text (tokenized once), not
what a config claims. The pre-tokenizer name is chosen from the tokenizer's own pre-tokenizer
(its split regex, or GPT-2's/SmolLM's fixed layout); one llama.cpp does not know is refused,
since llama.cpp would then split text differently and tokenize it wrongly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .safe import FormatError

__all__ = [
    "PRE_TOKENIZERS",
    "GGUFVocabulary",
    "gguf_vocabulary",
    "tokenizer_source",
    "write_vocabulary",
]

#: Split regex of a byte-level tokenizer -> llama.cpp's ``tokenizer.ggml.pre`` name.
PRE_TOKENIZERS: dict[str, str] = {
    # Llama 3 (and Falcon 3, SmolLM3, ...)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen 2 / 2.5 / 3: digits one at a time
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # GPT-4o (and Llama 4)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}
#: ``ByteLevel(use_regex=True)`` alone: GPT-2's built-in split.
GPT2_PRE = "gpt-2"
#: Single digits split off, then GPT-2's split (SmolLM, SmolLM2).
SMOLLM_PRE = "smollm"
#: A byte-level vocabulary without merges tokenizes to bytes whatever the split.
NO_MERGES_PRE = "default"

# llama.cpp's token types (gguf.TokenType), kept as ints so this module needs no gguf import.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPACE = "\u2581"  # SentencePiece's visible space
_PROBE = "a"  # tokenized once to see whether the tokenizer adds BOS / EOS


@dataclass
class GGUFVocabulary:
    """Everything llama.cpp needs to tokenize as the transformers tokenizer does."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)


def _component_types(node: dict | None) -> list[dict]:
    """The flat list of a normalizer/pre-tokenizer and the members of its Sequences."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        members = node.get("pretokenizers") or node.get("normalizers") or []
        return [m for child in members for m in _component_types(child)]
    return [node]


def _split_pattern(node: dict) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def _byte_level_pre(spec: dict, has_merges: bool) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer's pre-tokenizer, or refuse."""
    parts = _component_types(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if not has_merges:
        return NO_MERGES_PRE
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return GPT2_PRE
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return SMOLLM_PRE
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = PRE_TOKENIZERS.get(_split_pattern(parts[0]) or "")
        if name is not None:
            return name
    raise FormatError(
        f"tokenizer: its pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no "
        f"llama.cpp counterpart (known: {sorted({*PRE_TOKENIZERS.values(), GPT2_PRE, SMOLLM_PRE})})"
    )


def _is_sentencepiece(spec: dict) -> bool:
    model = spec["model"]
    parts = _component_types(spec.get("normalizer")) + _component_types(spec.get("pre_tokenizer"))
    metaspace = any(
        p.get("type") == "Metaspace"
        or (p.get("type") == "Prepend" and p.get("prepend") == _SPACE)
        or (p.get("type") == "Replace" and p.get("content") == _SPACE)
        for p in parts
    )
    return bool(model.get("byte_fallback")) or metaspace


def _add_space_prefix(spec: dict) -> bool:
    parts = _component_types(spec.get("normalizer")) + _component_types(spec.get("pre_tokenizer"))
    for p in parts:
        if p.get("type") == "Prepend" and p.get("prepend") == _SPACE:
            return True
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") in ("first", "always")
    return False


def _merge_strings(model: dict) -> list[str]:
    out = []
    for merge in model.get("merges") or []:
        pair = merge if isinstance(merge, list) else merge.split(" ")
        if len(pair) != 2 or " " in pair[0] or " " in pair[1]:
            raise FormatError(f"tokenizer: merge {merge!r} cannot be written as 'left right'")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _tokens(spec: dict, rows: int | None) -> tuple[list[str], list[int], set[int]]:
    """(tokens by id, their types, ids of added tokens) with gaps and the tail padded."""
    model = spec["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(by_id) + 1 if by_id else 0
    if rows is not None and size > rows:
        raise FormatError(f"tokenizer: {size} token ids but the model's embedding has {rows} rows")
    size = max(size, rows or 0)
    unk = model.get("unk_token")
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            special = added[i].get("special", False)
            types.append(UNKNOWN if token == unk else CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(UNKNOWN if token == unk else BYTE if _BYTE_TOKEN.match(token) else NORMAL)
    return tokens, types, set(added)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(value, int):
            ids[name] = value
    return ids


def _chat_templates(tokenizer: Any) -> dict[str, str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return {"": template}
    if isinstance(template, dict):  # named templates: "default" is the plain key
        return {("" if k == "default" else k): v for k, v in template.items()}
    return {}


def _load_tokenizer(source: Any) -> Any:
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as err:  # transformers raises OSError/ValueError/... on a folder without one
        raise FormatError(
            f"{source}: no tokenizer transformers can load ({type(err).__name__}: {err})"
        ) from None


def gguf_vocabulary(source: Any, rows: int | None = None) -> GGUFVocabulary:
    """The GGUF vocabulary of ``source`` (a tokenizer folder or a transformers fast tokenizer),
    padded to ``rows`` ids (the model's embedding rows) when given.

    Raises FormatError (one line) for a slow-only tokenizer, a model type other than BPE, more
    ids than ``rows``, or a pre-tokenizer llama.cpp does not know.
    """
    tokenizer = _load_tokenizer(source)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FormatError(
            f"tokenizer {type(tokenizer).__name__} has no tokenizer.json form (a fast tokenizer "
            "is needed to write its vocabulary into a GGUF)"
        )
    spec = json.loads(backend.to_str())
    kind = spec["model"].get("type")
    if kind != "BPE":
        raise FormatError(
            f"tokenizer: model type {kind!r} cannot be written to a GGUF (loraq writes BPE: "
            "byte-level as 'gpt2', SentencePiece-style as 'llama')"
        )
    tokens, types, _ = _tokens(spec, rows)
    merges = _merge_strings(spec["model"])
    probe = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    ids = _special_ids(tokenizer)
    vocab = GGUFVocabulary(
        model="gpt2",
        pre=None,
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=ids,
        add_bos="bos" in ids and probe[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]],
        add_eos="eos" in ids and probe[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]],
        chat_templates=_chat_templates(tokenizer),
    )
    if _is_sentencepiece(spec):
        vocab.model = "llama"
        vocab.add_space_prefix = _add_space_prefix(spec)
        rank = {m.replace(" ", ""): -float(k) for k, m in reversed(list(enumerate(merges)))}
        vocab.scores = [rank.get(t, 0.0) if ty == NORMAL else 0.0 for t, ty in zip(tokens, types)]
    else:
        vocab.pre = _byte_level_pre(spec, bool(merges))
    return vocab


def write_vocabulary(writer: Any, vocab: GGUFVocabulary) -> None:
    """Add ``vocab``'s ``tokenizer.*`` keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    elif vocab.model == "gpt2":
        # The gguf package writes no empty array; transformers then rebuilds the (no) merges
        # from scores. llama.cpp wants the merges key for BPE and will refuse such a file.
        import warnings

        writer.add_token_scores([0.0] * len(vocab.tokens))
        warnings.warn(
            "export_gguf: the byte-level tokenizer has no merges; llama.cpp refuses a BPE "
            "vocabulary without tokenizer.ggml.merges",
            stacklevel=4,
        )
    adders = {"bos": "add_bos_token_id", "eos": "add_eos_token_id"}
    adders.update(unk="add_unk_token_id", pad="add_pad_token_id")
    for name, token_id in vocab.special_ids.items():
        getattr(writer, adders[name])(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for name, template in vocab.chat_templates.items():
        if name:
            writer.add_string(f"tokenizer.chat_template.{name}", template)
        else:
            writer.add_chat_template(template)


def tokenizer_source(folder: str | os.PathLike[str] | None) -> Path | None:
    """``folder`` when it holds a tokenizer transformers can load, else None."""
    if folder is None:
        return None
    path = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return path if any((path / n).is_file() for n in names) else None
