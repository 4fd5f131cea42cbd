"""Batched generation over many adapters at once: ``loraq.generate`` and the decode batch under it.

The one decode loop of loraq: the library (:func:`generate`, :func:`generate_ids`), ``loraq
generate`` and ``loraq serve`` all run it.

A :class:`DecodeBatch` holds running sequences, each with its own adapter, sampling settings and
random generator, sharing one key/value cache (transformers' ``DynamicCache``) in which rows are
left-padded to a common length:

==========  =================================================================================
operation   what happens
==========  =================================================================================
add         new prompts are prefilled together (mixed adapters, left padding); their caches
            are padded on the left to the running length and stacked under the running rows
step        one decode step for every row: last token in, next token out (per-row sampling)
remove      finished rows leave (rows dropped from the cache, all-padding columns trimmed)
==========  =================================================================================

This is continuous batching: the serving engine calls ``add`` between steps as requests arrive.

Log-probabilities (``SamplingParams.logprobs``, ``prompt_logprobs``) are of the model's raw
distribution (log-softmax of the logits before temperature, top-k or top-p, as OpenAI reports
them), computed in float32 whatever the compute dtype; they are recorded per token as
:class:`TokenLogprob`. ``max_new_tokens=0`` with ``prompt_logprobs`` scores a prompt without
generating: the row finishes at prefill.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batching.mixed import MixedBatch
from ..batching.pool import AdapterPool
from ..batching.rows import adapter_rows, lora_layer_list, mixed_batch, validate_row_names
from ..model.surgery import adapter_names
from .lean_step import lean_decode_step
from .padding import pad_left
from .prefix_cache import PrefixCache, keep_prompts, prefill_inputs
from .sampling import sample_each
from .text import ReplyText


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability under the model's raw distribution, and the ``top``
    likeliest tokens at that position as ``(token, logprob)`` pairs, likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """One :class:`TokenLogprob` per row of ``logits`` (``(rows, vocab)``, any dtype; the
    log-softmax is taken in float32) for the token of that row, with ``top`` alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.as_tensor(tokens, device=logits.device)[:, None])[:, 0]
    chosen_list = chosen.tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen_list)
    return [TokenLogprob(int(t), c, tp) for t, c, tp in zip(tokens, chosen_list, tops)]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued.

    ``temperature <= 0`` is greedy. ``seed`` makes sampling reproducible per sequence: a row
    sampled in a batch draws exactly what it would draw alone. Generation stops at any of
    ``stop_token_ids`` (not included in the output) or after ``max_new_tokens``.

    ``logprobs`` (None: none) records each generated token's log-probability and its
    ``logprobs`` likeliest alternatives (0: the token's own only); ``prompt_logprobs`` records
    them for the prompt's tokens too (the first has none). ``max_new_tokens`` may be 0 only with
    ``prompt_logprobs``: the prompt is scored, nothing is generated.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        least = 0 if self.prompt_logprobs else 1
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < least:
            raise ValueError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(eq=False)
class SequenceState:
    """One prompt being continued: its adapter, settings, generated ids and why it stopped."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once finished
    generator: torch.Generator | None = None
    #: One per generated token when ``params.logprobs`` is set (and one for the stop token
    #: that ended the sequence, which ``generated`` leaves out).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    #: One per prompt token when ``params.prompt_logprobs`` (the first None: nothing before it).
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    def accept(self, token: int) -> None:
        """Record the next token and decide whether the sequence is finished."""
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
            return
        self.generated.append(token)
        if len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        """True once a stop token or the token limit was reached (or :meth:`stop` was called)."""
        return self.finish_reason is not None

    def stop(self, reason: str = "stop") -> None:
        """Finish the sequence now (e.g. a stop string appeared in its text)."""
        self.finish_reason = reason


def _cache_arg(model: nn.Module) -> str:
    # transformers >= 5.2x calls the key/value cache `cache`; older versions `past_key_values`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecodeBatch:
    """Running sequences sharing one left-padded key/value cache (see the module table).

    With ``per_row_adapters`` (the default) each row runs its sequence's ``adapter`` (None: the
    bare base) through :func:`~loraq.batching.rows.adapter_rows`; without, every row runs the
    model as it is set up (its active adapters, ``modules_to_save``, a plain model) and the
    sequences' ``adapter`` is ignored. With ``adapter_pool`` (an
    :class:`~loraq.batching.pool.AdapterPool` of ``model``, what ``loraq serve`` keeps) the rows'
    adapters are the pool's resident ones, not the model's own.
    """

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int = 0,
        *,
        per_row_adapters: bool = True,
        prefix_cache: PrefixCache | None = None,
        adapter_pool: AdapterPool | None = None,
    ) -> None:
        if prefix_cache is not None and not per_row_adapters:
            raise ValueError(
                "prefix_cache needs per_row_adapters=True (cached keys are kept per adapter)"
            )
        self.model = model
        self.prefix_cache = prefix_cache
        self.adapter_pool = adapter_pool
        self.pad_token_id = pad_token_id
        self.per_row_adapters = per_row_adapters
        self.sequences: list[SequenceState] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, cache length), 1 = real token
        self._last: torch.Tensor | None = None  # (rows,) the token to feed next
        self._next_pos: torch.Tensor | None = None  # (rows,) its position id
        self._cache_arg = _cache_arg(model)
        self._device = next(model.parameters()).device
        self._mixed_cache: tuple | None = None
        self._lora_layers: tuple[tuple, list] | None = None  # (adapter names, their layers)
        # decode steps skip transformers' per-layer machinery where the model allows it
        self._lean_step = lean_decode_step(model)

    def __len__(self) -> int:
        return len(self.sequences)

    def _mixed(self, adapters: list[str | None]) -> MixedBatch:
        # The running rows keep one selection from step to step: the row -> adapter mapping and
        # the stacked weights are made once per change of the rows, not once per step or layer.
        key = tuple(adapters)
        if self._mixed_cache is None or self._mixed_cache[0] != key:
            self._mixed_cache = (key, mixed_batch(self.model, adapters, pool=self.adapter_pool))
        return self._mixed_cache[1]

    @contextlib.contextmanager
    def _rows(self, adapters):
        """Each row runs its own adapter inside (a no-op without ``per_row_adapters``)."""
        batch = self._mixed(adapters) if self.per_row_adapters else None
        if batch is None:
            yield
            return
        with adapter_rows(self.model, batch):
            yield
        # Nothing edits adapter weights between the steps of one generation; structural
        # changes (adapters loaded or deleted) are still seen at every step.
        batch.check_versions = False

    def _forward(self, adapters, ids, mask, positions, cache, every_position: bool = False):
        with self._rows(adapters):
            out = self.model(
                input_ids=ids.to(self._device),
                attention_mask=mask.to(self._device),
                position_ids=positions.to(self._device),
                use_cache=True,
                logits_to_keep=0 if every_position else 1,
                **{self._cache_arg: cache},
            )
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if every_position:
            return out.logits, new_cache
        return out.logits[:, -1, :].float(), new_cache

    def _sample(self, logits: torch.Tensor, seqs: list[SequenceState]) -> list[int]:
        settings = [
            (0.0, None, None)
            if seq.finished
            else (seq.params.temperature, seq.params.top_k, seq.params.top_p)
            for seq in seqs
        ]
        tokens = sample_each(logits, settings, [seq.generator for seq in seqs])
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and not s.finished]
        scored = dict(zip(wanted, self._logprobs(logits, seqs, tokens, wanted)))
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.finished:  # scored only (max_new_tokens 0): nothing to generate
                continue
            before = len(seq.generated)
            seq.accept(token)
            # a stop token is reported too (OpenAI's, vLLM's): a scorer reading the logprob
            # of the one token after a prompt must find it whatever that token is
            if i in scored and (len(seq.generated) > before or seq.finish_reason == "stop"):
                seq.logprobs.append(scored[i])
        return tokens

    @staticmethod
    def _logprobs(logits, seqs, tokens, rows: list[int]) -> list[TokenLogprob]:
        out: list[TokenLogprob] = []
        for i in rows:  # a row at a time: each has its own number of alternatives
            out += token_logprobs(logits[i : i + 1], [tokens[i]], seqs[i].params.logprobs)
        return out

    @staticmethod
    def _record_prompt(logits: torch.Tensor, seqs: list[SequenceState]) -> None:
        """Prompt log-probabilities from the prefill's logits at every (left-padded) position."""
        width = logits.shape[1]
        for i, seq in enumerate(seqs):
            if not seq.params.prompt_logprobs:
                continue
            prompt = seq.prompt_ids
            start = width - len(prompt)  # logits at position p predict the token at p + 1
            scored = token_logprobs(
                logits[i, start : width - 1], prompt[1:], seq.params.logprobs or 0
            )
            seq.prompt_logprobs = [None, *scored]

    @torch.no_grad()
    def add(self, seqs: list[SequenceState]) -> None:
        """Prefill ``seqs`` (all in one pass) and let them join the running batch."""
        if not seqs:
            return
        for seq in seqs:
            if seq.generator is None and seq.params.seed is not None:
                seq.generator = torch.Generator(self._device).manual_seed(seq.params.seed)
        reused = self._reused(seqs)
        ids, mask, positions, past = prefill_inputs(
            [s.prompt_ids for s in seqs], reused, self.pad_token_id, self._device
        )
        every_position = any(s.params.prompt_logprobs for s in seqs)
        adapters = [s.adapter for s in seqs]
        logits = (
            None if every_position else self._prefill_as_step(adapters, ids, mask, positions, past)
        )
        if logits is not None:
            cache = past
        else:
            logits, cache = self._forward(adapters, ids, mask, positions, past, every_position)
        self._keep_prompts(seqs, cache, mask)
        if every_position:
            self._record_prompt(logits, seqs)
            logits = logits[:, -1, :].float()
        for seq in seqs:
            if seq.params.max_new_tokens == 0:
                seq.finish_reason = "length"
        tokens = self._sample(logits, seqs)
        last = torch.tensor(tokens, dtype=torch.long)
        next_pos = mask.sum(-1)
        if self._cache is None:
            self._cache, self._mask, self._last, self._next_pos = cache, mask, last, next_pos
        else:
            self._join(cache, mask, last, next_pos)
        self.sequences.extend(seqs)

    def _prefill_as_step(self, adapters, ids, mask, positions, past) -> torch.Tensor | None:
        """Logits of a prefill that has one token left per row after the prefix cache's keys
        (a repeated prompt): that is a decode step, run by the lean step (and its compiled
        layers) instead of the model's forward. None where it is not one, or no lean step."""
        if self._lean_step is None or ids.shape[1] != 1 or len(past.layers) == 0:
            return None
        with self._rows(adapters):
            return self._lean_step(
                ids[:, 0].to(self._device),
                positions[:, 0].to(self._device),
                mask.to(self._device),
                past,
            )

    def _reused(self, seqs: list[SequenceState]) -> list[tuple[int, list]]:
        """Per sequence, the prompt positions the prefix cache has (0 without one)."""
        if self.prefix_cache is None:
            return [(0, [])] * len(seqs)
        self.prefix_cache.check(self._adapter_state())
        return [
            (0, [])
            if s.params.prompt_logprobs
            else self.prefix_cache.lookup(self._prefix_key(s.adapter), s.prompt_ids)
            for s in seqs
        ]

    def _prefix_key(self, adapter: str | None) -> Hashable:
        # over a pool, cached keys belong to the adapter's weights as the pool loaded them
        # (AdapterPool.identity: a reload of other weights is a new key), and other adapters
        # coming and going leave them valid
        return adapter if self.adapter_pool is None else self.adapter_pool.identity(adapter)

    def _adapter_state(self) -> tuple:
        if self.adapter_pool is not None:
            return ("pool", id(self.adapter_pool))
        # what cached keys depend on besides the base: the adapters and their versions. The
        # LoRA layers are found again only when the adapter names change (as MixedBatch does):
        # a walk over every module at every request would cost more than the version reads.
        names = tuple(adapter_names(self.model))
        if self._lora_layers is None or self._lora_layers[0] != names:
            self._lora_layers = (names, lora_layer_list(self.model))
        return names, tuple(layer.adapter_version for layer in self._lora_layers[1])

    def _keep_prompts(self, seqs, cache, mask) -> None:
        if self.prefix_cache is not None:
            prompts = [(self._prefix_key(s.adapter), s.prompt_ids) for s in seqs]
            keep_prompts(self.prefix_cache, prompts, cache, mask)

    def _join(self, cache, mask, last, next_pos) -> None:
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([pad_left(old.keys, width, 2), pad_left(new.keys, width, 2)])
            old.values = torch.cat([pad_left(old.values, width, 2), pad_left(new.values, width, 2)])
        self._mask = torch.cat([pad_left(self._mask, width, 1), pad_left(mask, width, 1)])
        self._last = torch.cat([self._last, last])
        self._next_pos = torch.cat([self._next_pos, next_pos])

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: every running sequence gets its next token."""
        if not self.sequences:
            return
        mask = torch.cat([self._mask, torch.ones(len(self), 1, dtype=torch.long)], dim=1)
        adapters = [s.adapter for s in self.sequences]
        if self._lean_step is not None:
            with self._rows(adapters):
                logits = self._lean_step(
                    self._last.to(self._device),
                    self._next_pos.to(self._device),
                    mask.to(self._device),
                    self._cache,
                )
        else:
            logits, self._cache = self._forward(
                adapters, self._last[:, None], mask, self._next_pos[:, None], self._cache
            )
        self._mask = mask
        self._next_pos = self._next_pos + 1
        self._last = torch.tensor(self._sample(logits, self.sequences), dtype=torch.long)

    def remove(self, seqs: Sequence[SequenceState]) -> None:
        """Drop ``seqs`` from the batch (finished or abandoned) and trim all-padding columns."""
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.sequences) if id(s) not in gone]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._last = self._next_pos = None
            if self._lean_step is not None:
                self._lean_step.release()
            return
        rows = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[rows]
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column some row still uses
        self._mask = mask[:, start:]
        device_rows = rows.to(self._device)
        for layer in self._cache.layers:
            layer.keys = layer.keys[device_rows, :, start:]
            layer.values = layer.values[device_rows, :, start:]
        self._last = self._last[rows]
        self._next_pos = self._next_pos[rows]

    def finished(self) -> list[SequenceState]:
        """The sequences that have finished (still in the batch until :meth:`remove`)."""
        return [s for s in self.sequences if s.finished]


def run_to_completion(
    model: nn.Module,
    seqs: list[SequenceState],
    *,
    max_batch: int = 64,
    pad_token_id: int = 0,
    on_token: Callable[[SequenceState], None] | None = None,
    per_row_adapters: bool = True,
    adapter_pool: AdapterPool | None = None,
) -> list[SequenceState]:
    """Generate every sequence to its end, at most ``max_batch`` at a time (continuous batching).

    ``on_token(seq)`` is called after each new token of ``seq`` and may call ``seq.stop()``.
    ``per_row_adapters``, ``adapter_pool``: as in :class:`DecodeBatch`.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    pending = list(seqs)
    batch = DecodeBatch(
        model, pad_token_id, per_row_adapters=per_row_adapters, adapter_pool=adapter_pool
    )
    was_training = model.training
    if was_training:  # eval() walks every module: skip it when there is nothing to switch
        model.eval()
    try:
        while pending or len(batch):
            room = max_batch - len(batch)
            if room > 0 and pending:
                joining, pending = pending[:room], pending[room:]
                batch.add(joining)
                _notify(joining, on_token)
            else:
                batch.step()
                _notify(batch.sequences, on_token)
            batch.remove(batch.finished())
    finally:
        if was_training:
            model.train()
    return seqs


def _notify(seqs: list[SequenceState], on_token) -> None:
    if on_token is None:
        return
    for seq in seqs:
        if seq.generated and seq.finish_reason != "stop":
            on_token(seq)


def _per_row(value, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries but there are {n} prompts")
        return list(value)
    return [value] * n


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    adapter_names: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int | None] | None = None,
    stop: Sequence[str] | None = None,
    max_batch: int = 64,
) -> list[str]:
    """Continue every prompt, each with its own adapter, in shared batches; returns the new texts.

    Args:
        prompts: the texts to continue (tokenized with the tokenizer's special tokens).
        adapter_names: one adapter name (or None for the base) per prompt, run side by side in
            one batch; default: every prompt runs the model as it is set up (its active
            adapters, or a plain model).
        temperature, top_k, top_p: sampling (greedy when temperature is 0).
        seed: one seed for every row, or a list with one per row (None: unseeded).
        stop: strings that end a row's generation (cut from its text), besides the EOS token.
        max_batch: most rows decoded together; further prompts join as rows finish.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt in a list")
    n = len(prompts)
    per_row = adapter_names is not None
    names = validate_row_names(model, adapter_names) if per_row else [None] * n
    if len(names) != n:
        raise ValueError(f"adapter_names has {len(names)} entries but there are {n} prompts")
    seeds = _per_row(seed, n, "seed")
    stops = list(stop or [])
    eos = tokenizer.eos_token_id
    seqs = []
    for prompt, name, row_seed in zip(prompts, names, seeds):
        params = SamplingParams(
            max_new_tokens, temperature, top_k, top_p, row_seed, () if eos is None else (eos,)
        )
        seqs.append(SequenceState(list(tokenizer(prompt)["input_ids"]), name, params))

    replies = {id(seq): ReplyText(tokenizer, stops) for seq in seqs}

    def check_stop(seq: SequenceState) -> None:
        reply = replies[id(seq)]
        reply.add(seq.generated[reply.consumed :])
        if reply.stopped:
            seq.stop()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    run_to_completion(
        model,
        seqs,
        max_batch=max_batch,
        pad_token_id=pad,
        on_token=check_stop if stops else None,
        per_row_adapters=per_row,
    )
    texts = []
    for seq in seqs:
        reply = replies[id(seq)]
        reply.add(seq.generated[reply.consumed :])
        reply.finish()
        texts.append(reply.text)
    return texts


def generate_ids(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue one prompt given as token ids (``(1, T)`` or a flat list) with the model as it
    is set up; returns only the new ids, 1-D. Stops early at ``eos_token_id`` (not included).
    """
    prompt = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return torch.empty(0, dtype=torch.long)
    stop = () if eos_token_id is None else (eos_token_id,)
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop)
    seq = SequenceState(prompt, None, params)
    run_to_completion(model, [seq], per_row_adapters=False)
    return torch.tensor(seq.generated, dtype=torch.long)
