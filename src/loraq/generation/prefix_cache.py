"""Keys and values of recent prompts, reused by prompts that begin the same way (prefix caching).

A chat server sees the same system prompt, few-shot examples or conversation so far again and
again. :class:`PrefixCache` keeps the keys and values a prefill computed for recent prompts, and
:class:`~loraq.generation.decode.DecodeBatch` prefills a new prompt from its longest common prefix
with one of them, computing only the rest (as vLLM's automatic prefix caching and llama.cpp's
prompt cache do).

==============  ================================================================================
rule            why
==============  ================================================================================
keyed by        the row's adapter (None: the bare base) and the prompt's token ids: keys and
                values differ with the adapter
reuse           the longest common prefix with a cached prompt of the same adapter, at least
                ``min_tokens`` long and at most all but the prompt's last token (whose logits
                the prefill must compute)
invalidated     all at once when the model's adapters change (:meth:`check` with a new
                fingerprint; DecodeBatch's is the adapter names and every LoRA layer's
                ``adapter_version``): a loaded, reloaded or deleted adapter makes cached keys
                stale. In-place edits of adapter tensors are not seen (serving makes none)
bounded         ``max_bytes`` of key/value tensors; the least recently used prompts go first
==============  ================================================================================

Causal attention makes the keys and values at a position depend only on the tokens up to it, so
a common prefix's entries are what a full prefill computes (up to float rounding of differently
shaped products). Prompts that ask for ``prompt_logprobs`` are prefilled whole (they need the
logits of every position).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .padding import left_pad, pad_left

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MIN_TOKENS",
    "LayerKV",
    "PrefixCache",
    "keep_prompts",
    "prefill_inputs",
]

#: Default bound on the cached keys and values (``loraq serve --prefix-cache-mb``).
DEFAULT_MAX_BYTES = 64 << 20
#: Shortest common prefix worth reusing: a shorter one saves less than the bookkeeping costs.
DEFAULT_MIN_TOKENS = 8

#: Per decoder layer, the keys and values of one prompt: ``(1, kv_heads, tokens, head_dim)``.
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Entry:
    adapter: str | None
    tokens: tuple[int, ...]
    layers: LayerKV
    nbytes: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Recent prompts' keys and values, bounded by ``max_bytes`` (see the module doc).

    ``hits``, ``misses`` and ``reused_tokens`` count :meth:`lookup` results.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, min_tokens: int = DEFAULT_MIN_TOKENS
    ) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ValueError(f"min_tokens must be an integer >= 1, got {min_tokens!r}")
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._bytes = 0
        self._fingerprint: Hashable = None
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        return self._bytes

    def clear(self) -> None:
        """Drop every cached prompt."""
        self._entries.clear()
        self._bytes = 0

    def check(self, fingerprint: Hashable) -> None:
        """Drop everything if ``fingerprint`` (the model's adapter state) changed since the
        last call: cached keys and values were computed with other weights."""
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint

    def lookup(self, adapter: str | None, prompt: Sequence[int]) -> tuple[int, LayerKV]:
        """``(n, layers)``: the first ``n`` positions' keys and values for ``prompt`` under
        ``adapter``, from the cached prompt sharing the longest prefix; ``(0, [])`` if none
        shares at least ``min_tokens`` (a miss)."""
        best, found = 0, None
        for entry in self._entries.values():
            if entry.adapter == adapter:
                n = _common_prefix(entry.tokens, prompt)
                if n > best:
                    best, found = n, entry
        best = min(best, len(prompt) - 1)
        if found is None or best < self.min_tokens:
            self.misses += 1
            return 0, []
        self._entries.move_to_end((found.adapter, found.tokens))
        self.hits += 1
        self.reused_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in found.layers]

    def holds(self, adapter: str | None, prompt: Sequence[int]) -> bool:
        """Whether ``prompt`` under ``adapter`` is cached already (its keys need no copy)."""
        return (adapter, tuple(prompt)) in self._entries

    def keeps(self, tokens: int, nbytes: int) -> bool:
        """Whether :meth:`store` would keep a prompt of ``tokens`` tokens and ``nbytes`` bytes
        of keys and values (ask before copying them)."""
        return tokens >= self.min_tokens and nbytes <= self.max_bytes

    def store(self, adapter: str | None, prompt: Sequence[int], layers: LayerKV) -> None:
        """Keep ``prompt``'s keys and values (one ``(1, kv_heads, len(prompt), head_dim)`` pair
        per layer, owned by the cache from now on) unless it is shorter than ``min_tokens`` or
        alone larger than ``max_bytes``; older prompts go until the rest fits. A prompt held
        already is only made the most recent (``layers`` unread: ``[]`` will do)."""
        key = (adapter, tuple(prompt))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if not self.keeps(len(prompt), nbytes):
            return
        self._entries[key] = _Entry(adapter, key[1], layers, nbytes)
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes


def prefill_inputs(
    prompts: Sequence[Sequence[int]],
    reused: Sequence[tuple[int, LayerKV]],
    pad_id: int,
    device: torch.device,
):
    """``(ids, mask, positions, cache)`` of a prefill whose rows start after their reused
    positions (:meth:`PrefixCache.lookup`'s ``(n, layers)``, ``(0, [])`` for none).

    Each row's reused keys and values are left-padded to the longest and go into a fresh
    transformers ``DynamicCache``; its remaining prompt tokens are left-padded after them
    (padding inside a row is masked like any other). ``mask`` covers cache and tokens,
    ``positions`` are the tokens' own. With nothing reused it is the plain left-padded prefill.
    """
    from transformers import DynamicCache

    past = max(n for n, _ in reused)
    ids, rest_mask = left_pad([list(p[n:]) for p, (n, _) in zip(prompts, reused)], pad_id)
    done = torch.tensor([n for n, _ in reused], dtype=torch.long)
    positions = done[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    if past == 0:
        return ids, rest_mask, positions, cache
    cached = (torch.arange(past)[None, :] >= past - done[:, None]).long()
    sample = next(layers for n, layers in reused if n)  # the keys' shapes and dtype
    for index, (k0, v0) in enumerate(sample):
        keys, values = [], []
        for n, layers in reused:
            k, v = layers[index] if n else (k0[:, :, :0], v0[:, :, :0])
            keys.append(pad_left(k, past, 2))
            values.append(pad_left(v, past, 2))
        cache.update(torch.cat(keys).to(device), torch.cat(values).to(device), index)
    return ids, torch.cat([cached, rest_mask], 1), positions, cache


def keep_prompts(
    store: PrefixCache,
    rows: Sequence[tuple[str | None, Sequence[int]]],
    cache,
    mask: torch.Tensor,
) -> None:
    """Hand each prefilled row's prompt keys and values (the positions ``mask`` marks real in
    ``cache``, a ``DynamicCache`` of those rows) to ``store`` under ``(adapter, prompt)``."""
    per_token = sum(
        (layer.keys.shape[1] * layer.keys.shape[3]) * layer.keys.element_size()
        + (layer.values.shape[1] * layer.values.shape[3]) * layer.values.element_size()
        for layer in cache.layers
    )
    for i, (adapter, prompt) in enumerate(rows):
        if store.holds(adapter, prompt):
            store.store(adapter, prompt, [])  # only marks it recently used
            continue
        if not store.keeps(len(prompt), per_token * len(prompt)):
            continue  # not copied at all
        real = mask[i].nonzero().flatten().to(cache.layers[0].keys.device)
        layers = [
            (
                layer.keys[i : i + 1].index_select(2, real),
                layer.values[i : i + 1].index_select(2, real),
            )
            for layer in cache.layers
        ]
        store.store(adapter, prompt, layers)
