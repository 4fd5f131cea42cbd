"""Perplexity of a text with a sliding window, as lm-eval's ``wikitext`` task defines it.

The text is tokenized as lm-eval tokenizes a ``loglikelihood_rolling`` document (the
tokenizer's default special tokens) and a prefix token (BOS, else EOS) is put in front so the
first token is scored too. Targets are scored ``stride`` at a time; each block is predicted by
one forward pass over at most ``max_length`` tokens that end right before its last target::

    prefix t1 t2 t3 t4 t5 t6 t7        max_length 4, stride 2
    [prefix t1 t2 t3]  ->  scores t1 t2 t3 t4 ... (first window scores everything it sees)
    [t2 t3 t4 t5]      ->  scores t5 t6 ...
    stride == max_length is lm-eval's own rolling window (context_len 1), token for token.

From the summed log-likelihood ``ll`` (natural log) of all targets:

=================  ==========================================  =========================
metric             value                                       lm-eval's name
=================  ==========================================  =========================
token_perplexity   ``exp(-ll / tokens scored)``                (``perplexity`` per token)
word_perplexity    ``exp(-ll / words)``, words =                ``word_perplexity``
                   ``len(re.split(r"\\s+", text))``
byte_perplexity    ``exp(-ll / UTF-8 bytes)``                  ``byte_perplexity``
bits_per_byte      ``-ll / UTF-8 bytes / ln 2``                ``bits_per_byte``
=================  ==========================================  =========================
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Perplexity:
    """The scores of one text (see the module's table)."""

    loglikelihood: float
    tokens: int
    words: int
    bytes: int
    max_length: int
    stride: int

    @property
    def token_perplexity(self) -> float:
        """``exp(-loglikelihood / tokens)``."""
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        """``exp(-loglikelihood / words)`` (lm-eval's ``word_perplexity``)."""
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        """``exp(-loglikelihood / bytes)`` (lm-eval's ``byte_perplexity``)."""
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        """``-loglikelihood / bytes / ln 2`` (lm-eval's ``bits_per_byte``)."""
        return -self.loglikelihood / self.bytes / math.log(2)

    def as_dict(self) -> dict[str, Any]:
        """The counts and all four metrics, for JSON."""
        return {
            **asdict(self),
            "token_perplexity": self.token_perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def word_count(text: str) -> int:
    """Words as lm-eval's wikitext task counts them: pieces of ``re.split(r"\\s+", text)``."""
    return len(re.split(r"\s+", text))


def windows(n_targets: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_target)`` per forward pass over the sequence ``prefix + tokens``
    (indices into it): the input is ``[start, end)``, it scores targets ``first_target..end``
    (inclusive; target ``i`` is predicted from position ``i - 1``)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out = []
    first = 1
    while first <= n_targets:
        last = min(first + stride - 1, n_targets)
        if first == 1:  # the first window scores all it sees, as lm-eval's does
            last = min(max_length, n_targets)
        out.append((max(0, last - max_length), last, first))
        first = last + 1
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: Any, text: str, max_length: int, stride: int | None = None
) -> Perplexity:
    """Sliding-window perplexity of ``text`` under ``model`` (log-softmax in float32).

    ``stride`` (default ``max_length``) is how many new tokens each window scores; a smaller
    stride gives every token more context and costs ``max_length / stride`` times the compute.
    """
    stride = stride or max_length
    tokens = list(tokenizer.encode(text))
    if not tokens:
        raise ValueError("the text has no tokens to score")
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    sequence = torch.tensor([prefix, *tokens])
    device = next(model.parameters()).device
    total = 0.0
    for start, end, first in windows(len(tokens), max_length, stride):
        ids = sequence[start:end].to(device)[None]
        logits = model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = sequence[first : end + 1].to(device)
        rows = logprobs[first - 1 - start : end - start]
        total += rows.gather(-1, targets[:, None]).sum().item()
    return Perplexity(
        loglikelihood=total,
        tokens=len(tokens),
        words=word_count(text),
        bytes=len(text.encode("utf-8")),
        max_length=max_length,
        stride=stride,
    )
