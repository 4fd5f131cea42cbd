"""Picking the next token from logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick next-token ids from ``logits`` of shape (batch, vocab).

    ``temperature <= 0`` is greedy (argmax). Otherwise the logits are divided by the temperature,
    restricted to the ``top_k`` most likely tokens and/or the smallest set whose probability
    reaches ``top_p`` (nucleus), and a token is drawn with ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = _probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_each(
    logits: torch.Tensor,
    settings: Sequence[tuple[float, int | None, float | None]],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Row ``i``'s next token from ``logits`` (rows, vocab), as ``sample_next(logits[i:i+1],
    *settings[i], generators[i])`` picks it: the same token from the same generator state,
    which advances the same way. Rows that share ``(temperature, top_k, top_p)`` are computed
    together; each row's draw stays its own.

    ``torch.multinomial`` draws one sample as ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn over
    the row (its fast path, since PyTorch 1.x): here each row draws its ``q`` from its own
    generator and the divisions and argmaxes run over the group at once, which costs a fraction
    of one ``multinomial`` call per row (tests compare the two token for token).
    """
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, setting in enumerate(settings) if setting[0] > 0]
    if not sampled:
        return tokens
    # each row's Exp(1) draw, in row order (rows without a generator share the global one)
    q = {
        i: torch.empty(1, logits.shape[-1], device=logits.device).exponential_(
            1, generator=generators[i]
        )
        for i in sampled
    }
    groups: dict[tuple, list[int]] = {}
    for i in sampled:
        groups.setdefault(tuple(settings[i]), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        probs = _probabilities(logits.index_select(0, index), temperature, top_k, top_p)
        if not bool(((probs >= 0) & (probs < float("inf"))).all()):
            for p in probs:  # NaN, Inf or a negative: multinomial's own error
                torch.multinomial(p[None], 1)
        picks = (probs / torch.cat([q[i] for i in rows])).argmax(dim=-1).tolist()
        for row, pick in zip(rows, picks):
            tokens[row] = pick
    return tokens


def _probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """The sampling distribution of each row of ``logits`` (see :func:`sample_next`)."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)
