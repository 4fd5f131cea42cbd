"""loraq.train.data: readers, completion masking, packing, collation, resumable order."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from loraq.train.config import ConfigError, from_dict
from loraq.train.data import (
    IGNORE_INDEX,
    causal_lm_example,
    collate,
    epoch_order,
    infer_labels,
    load_datasets,
    micro_batches,
    pack,
    read_records,
    seq_cls_example,
)
from test_train_support import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n', encoding="utf-8")
    (tmp_path / "a.csv").write_text('text,label\n"hi, there",pos\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("text\tlabel\nhi\tneg\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert read_records(tmp_path / "a.jsonl") == [{"text": "x"}, {"text": "y"}]
    assert read_records(tmp_path / "a.csv") == [{"text": "hi, there", "label": "pos"}]
    assert read_records(tmp_path / "a.tsv") == [{"text": "hi", "label": "neg"}]
    assert read_records(tmp_path / "a.txt") == [{"text": "one"}, {"text": "two"}]


@pytest.mark.parametrize("name", ["a.tsv", "a.csv", "a.jsonl", "a.txt"])
def test_readers_skip_a_byte_order_mark(tmp_path, name):
    # Excel and Notepad start UTF-8 files with U+FEFF: it must not become part of the header
    body = {
        "a.tsv": "text\tlabel\nhi\tneg\n",
        "a.csv": "text,label\nhi,neg\n",
        "a.jsonl": '{"text": "hi", "label": "neg"}\n',
        "a.txt": "hi\n",
    }[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = read_records(tmp_path / name)
    assert records[0]["text"] == "hi"
    assert all("\ufeff" not in key for key in records[0])


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "a.parquet").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot tell the format.*data.format"):
        read_records(tmp_path / "a.parquet")


def test_completion_only_labels(tok):
    ex = causal_lm_example({"prompt": "ab", "completion": "cd"}, tok, 64)
    prompt_ids = tok("ab")["input_ids"]  # BOS + a + b
    completion = tok("cd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + completion
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion


def test_instruction_and_text_records(tok):
    ex = causal_lm_example({"instruction": "do", "input": "this", "output": "ok"}, tok, 256)
    text = tok.decode(ex["input_ids"], skip_special_tokens=True)
    assert "### Instruction:\ndo" in text and "### Input:\nthis" in text and text.endswith("ok")
    n_learned = sum(label != IGNORE_INDEX for label in ex["labels"])
    assert n_learned == 3  # "o", "k", EOS
    ex = causal_lm_example({"text": "hello"}, tok, 256)
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]
    with pytest.raises(ConfigError, match=r"row 3 has fields \['question'\].*'prompt' and"):
        causal_lm_example({"question": "?"}, tok, 8, where="row 3")


def test_truncation(tok):
    ex = causal_lm_example({"prompt": "abc", "completion": "defgh"}, tok, 6)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 6


def test_seq_cls_example_and_errors(tok):
    ex = seq_cls_example({"text": "hi", "label": "b"}, tok, 16, "text", "label", {"a": 0, "b": 1})
    assert ex == {"input_ids": tok("hi")["input_ids"], "label": 1}
    with pytest.raises(ConfigError, match=r"no text column 'sentence'.*data.text_column"):
        seq_cls_example({"text": "hi", "label": "a"}, tok, 16, "sentence", "label", {"a": 0})
    with pytest.raises(ConfigError, match=r"no label column 'y'"):
        seq_cls_example({"text": "hi", "label": "a"}, tok, 16, "text", "y", {"a": 0})
    with pytest.raises(ConfigError, match=r"label 'c' is not one of"):
        seq_cls_example({"text": "hi", "label": "c"}, tok, 16, "text", "label", {"a": 0})
    assert infer_labels([{"l": "2"}, {"l": "10"}, {"l": "2"}], "l", "f") == ["2", "10"]
    assert infer_labels([{"l": "pos"}, {"l": "neg"}], "l", "f") == ["neg", "pos"]


def test_pack_keeps_every_token_in_order():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [-100, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, 7, 8, 9]},
    ]
    blocks = pack(examples, 4)
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 1]
    assert list(itertools.chain(*(b["input_ids"] for b in blocks))) == list(range(1, 10))
    assert blocks[1]["labels"] == [5, -100, 7, 8]


def test_collate_pads_right():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = collate([{"input_ids": [1], "label": 1}, {"input_ids": [2, 3], "label": 0}], 0)
    assert cls["labels"].tolist() == [1, 0]


def test_order_is_seeded_and_resumable():
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    assert sorted(epoch_order(10, 3, 2)) == list(range(10))
    examples = [{"input_ids": [i + 1], "label": i % 2} for i in range(10)]
    full = list(itertools.islice(micro_batches(examples, 3, 7, 0), 11))  # crosses 2 epochs
    resumed = list(
        itertools.islice(micro_batches(examples, 3, 7, 0, full[5].epoch, full[5].next_index), 5)
    )
    for m1, m2 in zip(full[6:], resumed):
        assert (m1.epoch, m1.next_index) == (m2.epoch, m2.next_index)
        assert torch.equal(m1.batch["input_ids"], m2.batch["input_ids"])
    assert [m.epoch for m in full] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_load_datasets_split_and_labels(tmp_path, tok, monkeypatch):
    rows = [{"text": f"t{i}", "label": ["x", "y"][i % 2]} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = from_dict(
        {
            "model": {"path": "m", "task": "seq-cls"},
            "data": {"train": str(tmp_path / "d.jsonl"), "eval_split": 0.25},
        }
    )
    data = load_datasets(cfg, tok)
    assert data.labels == ["x", "y"]
    assert (data.train_records, data.eval_records) == (15, 5)
    assert data.pad_id == tok.pad_token_id
    cfg.model.task = "causal-lm"
    cfg.data.packing, cfg.data.max_length = True, 8
    packed = load_datasets(cfg, tok)
    assert all(len(ex["input_ids"]) <= 8 for ex in packed.train)
    assert len(packed.train) < 15
