"""Small trained tokenizers of the kinds real models ship, saved as transformers folders, and
the test strings their GGUF forms must tokenize identically."""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PIECES = [
    "Hello",
    "world",
    " the",
    "quick brown fox",
    "don't",
    "I'll",
    "we've",
    "3.14159",
    "2024-12-07",
    "1234567",
    "café",
    "naïve",
    "Ünïcödé",
    "日本語のテキスト",
    "中文",
    "한국어",
    "Здравствуй",
    "مرحبا",
    "😀",
    "👩‍💻",
    "🇫🇷",
    "\t",
    "\n",
    "\n\n",
    "  ",
    "    ",
    " \n ",
    "\r\n",
    "<think>",
    "a+b=c",
    "foo_bar()",
    "{'k': [1, 2]}",
    "https://example.org/x?y=1",
    "…",
    "—",
    "ß",
    "İ",
    "x",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'll say it's fine, we've done it.",
    "Numbers like 12345 and 3.14159 appear in 2024-12-07 logs; café naïve résumé.",
    "def foo_bar(x):\n    return {'k': [1, 2]}\n\nprint(foo_bar(3))",
    "日本語のテキスト 中文 한국어 Здравствуй мир مرحبا بالعالم 😀 👩‍💻",
] * 20


def sample_strings(count: int = 300, seed: int = 0) -> list[str]:
    """``count`` strings mixing words, digits, unicode and whitespace runs (fixed seed)."""
    rng = random.Random(seed)
    out = ["", " ", "  leading", "trailing  ", "\n", "a", " a", *_PIECES]
    while len(out) < count:
        parts = rng.choices(_PIECES, k=rng.randint(1, 6))
        seps = rng.choices(["", " ", "  ", "\n", "\t"], k=len(parts))
        out.append("".join(p + s for p, s in zip(parts, seps)))
    return out[:count]


def _trained(pre, normalizer=None, vocab_size: int = 400, alphabet=None):
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet or [], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save(tok, folder: Path, **specials) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def byte_level_folder(folder: Path, style: str) -> Path:
    """A byte-level BPE tokenizer in the style of ``llama3``, ``qwen2``, ``gpt2`` or ``smollm``."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(style)
    if split is not None:
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
    elif style == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    tok = _trained(pre, alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end|>", "<|user|>", "<|assistant|>", "<|pad|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    if style == "llama3":  # Llama 3 adds BOS; Qwen / GPT-2 / SmolLM add nothing
        bos = tok.token_to_id("<|begin|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin|> $A", special_tokens=[("<|begin|>", bos)]
        )
    return _save(tok, folder, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>")


def sentencepiece_folder(folder: Path, style: str = "prepend") -> Path:
    """A Llama-2-style BPE over "▁" with byte fallback: ``prepend`` (a Prepend+Replace
    normalizer, as Llama 2's tokenizer.json) or ``metaspace`` (a Metaspace pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if style == "prepend":
        normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        pre = None
    else:
        normalizer = None
        pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trained = _trained(pre, normalizer)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in __import__("json").loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in vocab][:3])
    return _save(tok, folder, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
