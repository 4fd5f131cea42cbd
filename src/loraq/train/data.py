"""Data: read files, tokenize, mask prompts, pack, and batch in a seeded, resumable order.

The pieces, each usable on its own:

* :func:`read_records` — a file to a list of dicts (JSONL objects, CSV/TSV rows, text lines).
* :func:`causal_lm_example` — one record to ``input_ids`` and ``labels``, where prompt tokens
  are labelled -100 so only the completion is learned. Records hold ``prompt``/``completion``,
  ``instruction``/``input``/``output`` (formatted with :data:`INSTRUCTION_TEMPLATE`) or ``text``
  (every token is learned).
* :func:`seq_cls_example` — one record to ``input_ids`` and an integer ``label``.
* :func:`pack` — concatenate causal-LM examples and cut them into fixed-length blocks.
* :func:`epoch_order` / :func:`micro_batches` — a permutation per epoch from a seeded
  ``torch.Generator``, so the order of any epoch can be rebuilt on resume; one walk serves one
  process and each of N ranks (:class:`MicroBatch`).
* :func:`collate` — pad a list of examples into tensors.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainConfig

IGNORE_INDEX = -100
#: How ``instruction``/``input``/``output`` records become a prompt (Alpaca-style).
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


def detect_format(path: str | Path) -> str:
    """``jsonl``, ``csv``, ``tsv`` or ``text`` from the file suffix; ConfigError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(
            f"cannot tell the format of '{path}' from its suffix '{suffix}': use .jsonl, .csv, "
            ".tsv or .txt, or set data.format"
        )
    return _SUFFIX_FORMATS[suffix]


def read_records(path: str | Path, format: str = "auto") -> list[dict[str, Any]]:
    """Read a data file into a list of dicts.

    JSONL: one JSON object per line (blank lines skipped). CSV/TSV: a header row names the
    columns. Text: one ``{"text": line}`` per non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist")
    fmt = detect_format(path) if format == "auto" else format
    try:
        # utf-8-sig: a byte-order mark (Excel and Notepad write one) is not part of the header
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data file '{path}' is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    if fmt == "jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {record!r:.60}")
            records.append(record)
        return records
    if fmt in ("csv", "tsv"):
        return _read_table(path, text, fmt)
    if fmt == "text":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    raise ConfigError(f"data.format '{fmt}' is not one of auto, jsonl, csv, tsv, text")


def _read_table(path: Path, text: str, fmt: str) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV file with a header; a row with too few or too many fields is an error
    naming its line. TSV is read without quote processing: a ``"`` is an ordinary character."""
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ConfigError(f"'{path}' has no header row naming its columns")
        duplicates = sorted({h for h in header if header.count(h) > 1})
        if duplicates:
            raise ConfigError(f"'{path}' line 1: the header names column(s) {duplicates} twice")
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                raise ConfigError(
                    f"'{path}' line {reader.line_num}: row has {len(row)} field(s), the header "
                    f"has {len(header)} ({', '.join(header)})"
                )
            rows.append(dict(zip(header, row)))
        return rows
    except csv.Error as err:
        raise ConfigError(
            f"'{path}' line {reader.line_num}: not valid {fmt.upper()} ({err})"
        ) from None


def _token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_and_completion(record: dict[str, Any], where: str = "record") -> tuple[str, str]:
    """Split a causal-LM record into (prompt, completion); prompt is '' for ``text`` records."""
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]), str(record["completion"])
    if "instruction" in record and "output" in record:
        extra = str(record.get("input") or "")
        template = INSTRUCTION_INPUT_TEMPLATE if extra else INSTRUCTION_TEMPLATE
        return template.format(instruction=record["instruction"], input=extra), str(
            record["output"]
        )
    if "text" in record:
        return "", str(record["text"])
    raise ConfigError(
        f"{where} has fields {sorted(record)}; a causal-lm record needs 'prompt' and "
        "'completion', 'instruction' and 'output' (optionally 'input'), or 'text'"
    )


def causal_lm_example(record: dict[str, Any], tokenizer, max_length: int, where: str = "record"):
    """Tokenize one record: ``{"input_ids": [...], "labels": [...]}``, prompt labels -100.

    The prompt (with the tokenizer's special prefix such as BOS) and the completion are tokenized
    separately, so the mask boundary is exact; EOS is appended to the completion when the
    tokenizer has one. Examples longer than ``max_length`` are truncated at the end.
    """
    prompt, completion = prompt_and_completion(record, where)
    prompt_ids = _token_ids(tokenizer, prompt, special=True)
    completion_ids = _token_ids(tokenizer, completion, special=False)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def seq_cls_example(
    record: dict[str, Any],
    tokenizer,
    max_length: int,
    text_column: str,
    label_column: str | None,
    label2id: dict[str, int] | None,
    where: str = "record",
):
    """Tokenize one record: ``{"input_ids": [...], "label": int}`` (no label if column None)."""
    if text_column not in record:
        raise ConfigError(
            f"{where} has no text column '{text_column}' (columns: {sorted(record)}); "
            "set data.text_column"
        )
    ids = list(
        tokenizer(str(record[text_column]), truncation=True, max_length=max_length)["input_ids"]
    )
    example: dict[str, Any] = {"input_ids": ids}
    if label_column is not None:
        if label_column not in record:
            raise ConfigError(
                f"{where} has no label column '{label_column}' (columns: {sorted(record)}); "
                "set data.label_column"
            )
        label = _label_text(record[label_column])
        if not label:
            raise ConfigError(f"{where} has no label (column '{label_column}' is empty or null)")
        if label2id is not None and label not in label2id:
            raise ConfigError(f"{where}: label {label!r} is not one of {sorted(label2id)}")
        example["label"] = label2id[label] if label2id is not None else int(label)
    return example


def infer_labels(records: list[dict[str, Any]], label_column: str, where: str) -> list[str]:
    """Sorted distinct label names of a seq-cls data set (numerically if all are integers)."""
    if records and label_column not in records[0]:
        raise ConfigError(
            f"{where} has no label column '{label_column}' (columns: {sorted(records[0])}); "
            "set data.label_column"
        )
    names = set()
    for i, record in enumerate(records):
        name = _label_text(record.get(label_column))
        if not name:
            raise ConfigError(
                f"{where} row {i + 1} has no label (column '{label_column}' is missing, empty "
                "or null)"
            )
        names.add(name)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _label_text(value: Any) -> str:
    """A label as its class name; '' for a missing or null label."""
    return "" if value is None else str(value).strip()


def pack(examples: list[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate examples (ids and labels) and cut into blocks of ``block_size`` tokens.

    Documents are joined back to back with no attention barrier between them (the usual simple
    packing); the last, shorter block is kept.
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [
        {"input_ids": ids[i : i + block_size], "labels": labels[i : i + block_size]}
        for i in range(0, len(ids), block_size)
    ]


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest; labels are padded with -100."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if "labels" in examples[0]:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, ex in enumerate(examples):
            labels[i, : len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
        batch["labels"] = labels
    elif "label" in examples[0]:
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation from a generator seeded by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Micro-batches in one epoch (the last one may be smaller)."""
    return (n + batch_size - 1) // batch_size


@dataclass(frozen=True)
class MicroBatch:
    """One item of the training stream (:func:`micro_batches`), for one process or one rank.

    Attributes:
        epoch: the epoch this micro-batch belongs to.
        next_index: index, within ``epoch``, of the next global micro-batch: where a resumed
            stream starts.
        batch: this process's collated examples (under N ranks, its share of the global batch).
        global_items: loss items (:func:`loss_items`) of the whole global micro-batch.
        weight: 1.0; 0.0 for a placeholder share (see :func:`micro_batches`).
    """

    epoch: int
    next_index: int
    batch: dict[str, torch.Tensor]
    global_items: int
    weight: float = 1.0


def loss_items(examples: list[dict[str, Any]]) -> int:
    """Items a mean loss divides by, by the rule :func:`collate` labels with: the labelled
    next-token targets of token ``labels`` (causal-lm), else one per example (seq-cls)."""
    if not examples or "labels" not in examples[0]:
        return len(examples)
    return sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in examples)


def micro_batches(
    examples: list[dict[str, Any]],
    batch_size: int,
    seed: int,
    pad_id: int,
    start_epoch: int = 0,
    start_batch: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[MicroBatch]:
    """Endless stream of :class:`MicroBatch` over shuffled epochs, for one process or for rank
    ``rank`` of ``world_size``.

    The global micro-batch k holds ``batch_size * world_size`` examples, exactly the k-th
    batch of one process with that batch size; rank r gets examples ``[r*b, (r+1)*b)`` of it.
    A short last batch gives later ranks fewer, possibly none: such a rank gets the global
    batch's first example with weight 0, so that it still joins every collective. Starting at
    ``(start_epoch, start_batch)`` reproduces exactly the batches an uninterrupted stream would
    yield from that point on, which is what resuming needs.
    """
    if not examples or batch_size <= 0:
        raise ValueError(
            f"micro_batches needs examples and a positive batch_size (got {len(examples)} "
            f"examples, batch_size {batch_size}); an empty stream would never yield"
        )
    global_size = batch_size * world_size
    n_batches = batches_per_epoch(len(examples), global_size)
    epoch, index = start_epoch, start_batch
    while True:
        order = epoch_order(len(examples), seed, epoch)
        while index < n_batches:
            chunk = [examples[i] for i in order[index * global_size : (index + 1) * global_size]]
            index += 1
            mine = chunk[rank * batch_size : (rank + 1) * batch_size]
            weight = 1.0 if mine else 0.0
            batch = collate(mine or chunk[:1], pad_id)
            yield MicroBatch(epoch, index, batch, loss_items(chunk), weight)
        epoch, index = epoch + 1, 0


def eval_batches(examples: list[dict[str, Any]], batch_size: int, pad_id: int):
    """Batches over ``examples`` in file order (for evaluation)."""
    if batch_size <= 0:
        raise ValueError(f"eval batch size must be > 0, got {batch_size}")
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_id)


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class Datasets:
    """Tokenized examples and, for seq-cls, the label names in class-id order."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None
    pad_id: int
    train_records: int
    eval_records: int


def tokenize_records(
    records: list[dict[str, Any]],
    cfg: TrainConfig,
    tokenizer,
    labels: list[str] | None,
    where: str,
    pack_blocks: bool = False,
) -> list[dict[str, Any]]:
    """Tokenize records for ``cfg.model.task`` (and pack them if asked)."""
    d = cfg.data
    if cfg.model.task == "seq-cls":
        label2id = {name: i for i, name in enumerate(labels or [])}
        return [
            seq_cls_example(
                r,
                tokenizer,
                d.max_length,
                d.text_column,
                d.label_column,
                label2id,
                f"{where} row {i + 1}",
            )
            for i, r in enumerate(records)
        ]
    examples = [
        causal_lm_example(r, tokenizer, d.max_length, f"{where} record {i + 1}")
        for i, r in enumerate(records)
    ]
    # An example whose prompt fills max_length has nothing left to learn from: drop it.
    kept = [ex for ex in examples if any(t != IGNORE_INDEX for t in ex["labels"][1:])]
    if records and not kept:
        raise ConfigError(
            f"every example in '{where}' has no completion token within data.max_length="
            f"{d.max_length}; raise data.max_length"
        )
    return pack(kept, d.max_length) if pack_blocks else kept


def load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    """Read, split, label and tokenize the train and eval data that ``cfg.data`` names."""
    d = cfg.data
    train_records = read_records(d.train, d.format)
    if not train_records:
        raise ConfigError(f"data.train '{d.train}' holds no examples")
    if d.max_train_samples:
        train_records = train_records[: d.max_train_samples]
    if d.eval:
        eval_records = read_records(d.eval, d.format)
    elif d.eval_split > 0:
        order = list(range(len(train_records)))
        random.Random(cfg.training.seed).shuffle(order)
        n_eval = max(1, int(round(len(order) * d.eval_split)))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
        if not train_records:
            raise ConfigError(
                f"data.eval_split={d.eval_split} holds out all {n_eval} record(s) of "
                f"data.train '{d.train}', leaving none to train on: add records, lower "
                "data.eval_split or give data.eval"
            )
    else:
        eval_records = []
    if d.max_eval_samples:
        eval_records = eval_records[: d.max_eval_samples]

    labels = None
    if cfg.model.task == "seq-cls":
        labels = (
            list(d.labels) if d.labels else infer_labels(train_records, d.label_column, d.train)
        )
        if len(labels) < 2:
            raise ConfigError(
                f"data.train '{d.train}' has fewer than two distinct labels in column "
                f"'{d.label_column}': {labels}"
            )

    train = tokenize_records(train_records, cfg, tokenizer, labels, d.train, pack_blocks=d.packing)
    if not train:
        raise ConfigError(f"data.train '{d.train}' yields no training examples")
    evaluation = tokenize_records(eval_records, cfg, tokenizer, labels, d.eval or d.train)
    return Datasets(
        train=train,
        eval=evaluation,
        labels=labels,
        pad_id=pad_id_of(tokenizer),
        train_records=len(train_records),
        eval_records=len(eval_records),
    )
