"""Tiny models, tokenizers and data files for the loraq.train / CLI tests (built in code, offline).

Other test modules import the builders from here; the tests at the bottom check the builders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer(bos_prefix: bool = True):
    """A character-level ``PreTrainedTokenizerFast``: ids 0-3 special, then printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos_prefix:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer random-weight LlamaForCausalLM (hidden 48) and the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        # Larger than the default 0.02, so that a frozen random lm_head can still produce
        # confident logits (with 0.02 the logit range is about +-1 and LoRA stalls at loss ~3.7).
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Save a 2-layer random-weight BertModel (hidden 32; no classifier) and a char tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_pattern_jsonl(path: Path, n: int = 32) -> Path:
    """Prompt/completion records of one fixed pattern (for 'learn it and reproduce it')."""
    rows = [{"prompt": "abc:", "completion": "xyzxyz"} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_sentiment_tsv(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A tiny, trivially separable two-label TSV ("good ..." vs "bad ...")."""
    import random

    rng = random.Random(seed)
    lines = ["text\tlabel"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = "good" if label == "pos" else "bad"
        lines.append(f"{word} {rng.choice(['cat', 'dog', 'day', 'film'])}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_config(path: Path, sections: dict) -> Path:
    """Write a YAML config file from nested dicts."""
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path


def test_char_tokenizer_round_trip():
    tok = char_tokenizer()
    ids = tok("ab c")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "ab c"
    assert tok("ab", add_special_tokens=False)["input_ids"] == ids[1:3]


def test_tiny_llama_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    out = model(**tok("hi", return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)
