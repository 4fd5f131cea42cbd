"""Preference pairs: ``prompt`` / ``chosen`` / ``rejected`` records to token pairs.

A record is plain text or chat messages (the format TRL's ``DPOTrainer`` reads)::

    {"prompt": "Q: 2+2?\\nA:", "chosen": " 4", "rejected": " 5"}
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]}

Each answer is tokenized together with its prompt and split where the prompt's own tokens stop
agreeing with it (tokens can merge across the boundary, and chat templates may render a prompt
alone differently), exactly as ``DPOTrainer`` does; plain-text answers end in the tokenizer's
EOS. An example is ``{"chosen": {"input_ids", "labels"}, "rejected": {...}}`` with the prompt's
labels -100, so :func:`loraq.train.data.collate` stacks a batch of pairs as the chosen rows,
then the rejected rows, and only answer tokens are scored.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, TrainConfig
from .data import IGNORE_INDEX

#: The fields a preference record must hold.
PAIR_FIELDS = ("prompt", "chosen", "rejected")


#: The keys every chat message must hold: a string role; content as a string (or a list of
#: content parts, which some chat templates render).
MESSAGE_KEYS = {"role": (str,), "content": (str, list)}


def _check_messages(messages: list, where: str, name: str) -> None:
    """ConfigError naming the field and message of a malformed chat-message list."""
    if not messages:
        raise ConfigError(f"{where} field '{name}' is an empty list of chat messages")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ConfigError(
                f"{where} field '{name}' message {i} must be an object with 'role' and "
                f"'content', got {message!r:.60}"
            )
        for key, types in MESSAGE_KEYS.items():
            if not isinstance(message.get(key), types):
                got = "none" if key not in message else repr(message[key])[:60]
                raise ConfigError(
                    f"{where} field '{name}' message {i} needs a string '{key}', got {got}"
                )


def _check_fields(record: dict[str, Any], where: str) -> bool:
    """True for chat records, False for text ones; ConfigError naming a bad field."""
    for name in PAIR_FIELDS:
        if name not in record:
            raise ConfigError(
                f"{where} has no '{name}' field (fields: {sorted(record)}); a preference record "
                "needs 'prompt', 'chosen' and 'rejected'"
            )
    chat = isinstance(record["prompt"], list)  # a list is chat messages, well formed or not
    for name in PAIR_FIELDS:
        value = record[name]
        if chat and isinstance(value, list):
            _check_messages(value, where, name)
        elif chat or not isinstance(value, str):
            kind = "a list of chat messages (as 'prompt')" if chat else "a string (as 'prompt')"
            raise ConfigError(f"{where} field '{name}' must be {kind}, got {value!r:.60}")
    if record["chosen"] == record["rejected"]:
        raise ConfigError(
            f"{where} field 'rejected' is identical to 'chosen': a pair needs two different answers"
        )
    return chat


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], where: str, name: str, **kwargs) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{where} field 'prompt' holds chat messages but the tokenizer has no chat template"
        )
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except Exception as err:  # the template's own checks (jinja2's raise_exception, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{where} field '{name}': the chat template refused it: {first}"
        ) from None
    return list(out["input_ids"])


def preference_example(
    record: dict[str, Any], tokenizer, max_length: int, where: str = "record"
) -> dict[str, dict[str, list[int]]]:
    """Tokenize one pair: ``{"chosen": {"input_ids", "labels"}, "rejected": {...}}``.

    Sequences longer than ``max_length`` lose their end. Raises ConfigError naming the record
    and field for a missing field, malformed chat messages, identical answers (also when they
    differ only past ``max_length``), or a prompt that leaves no room for an answer within
    ``max_length``.
    """
    if _check_fields(record, where):
        prompt = _chat_ids(tokenizer, record["prompt"], where, "prompt", add_generation_prompt=True)
        full = {
            k: _chat_ids(tokenizer, record["prompt"] + record[k], where, k) for k in PAIR_FIELDS[1:]
        }
    else:
        eos = tokenizer.eos_token or ""
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        full = {}
        for k in PAIR_FIELDS[1:]:
            answer = record[k] if record[k].endswith(eos) else record[k] + eos
            full[k] = list(tokenizer(record["prompt"] + answer)["input_ids"])
    cut = min(_common_prefix(prompt, ids) for ids in full.values())
    if cut >= max_length:
        raise ConfigError(
            f"{where} field 'prompt' is {cut} tokens, which leaves no room for an answer within "
            f"data.max_length={max_length}"
        )
    out = {}
    for k, ids in full.items():
        if len(ids) == cut:
            raise ConfigError(f"{where} field '{k}' has no tokens after the prompt")
        labels = [IGNORE_INDEX] * cut + ids[cut:]
        out[k] = {"input_ids": ids[:max_length], "labels": labels[:max_length]}
    if out["chosen"] == out["rejected"]:  # they differ only past the cut: nothing to learn
        raise ConfigError(
            f"{where} field 'rejected' equals 'chosen' within data.max_length={max_length} "
            "tokens (they differ only after it)"
        )
    return out


def tokenize_pairs(
    records: list[dict[str, Any]],
    cfg: TrainConfig,
    tokenizer,
    labels: list[str] | None,
    where: str,
    pack_blocks: bool = False,
) -> list[dict[str, Any]]:
    """Every record as a :func:`preference_example` (the signature of
    :func:`loraq.train.data.tokenize_records`, whose place it takes for preference methods)."""
    return [
        preference_example(r, tokenizer, cfg.data.max_length, f"{where} record {i + 1}")
        for i, r in enumerate(records)
    ]
