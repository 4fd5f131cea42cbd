"""Hostile GGUF files: every claim a file makes is checked against its size and its tensors.

Each file here is built byte by byte (``struct.pack``) or rewritten from a good tiny export, and
must end as one FormatError naming the file and the key or tensor, quickly: the ``bounded``
guard turns a hang (the ``gguf`` reader looping over 2**40 claimed elements, a model built with
2**31 layers) into a failure instead of a stuck test run. No timing is asserted.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import loraq
from loraq import cli
from loraq.io.gguf_read import load_gguf, load_gguf_tokenizer
from loraq.io.gguf_write import export_gguf
from loraq.io.safe import FormatError

gguf = pytest.importorskip("gguf")
from conftest import tiny_llama  # noqa: E402
from test_train_support import write_config, write_pattern_jsonl  # noqa: E402

# GGUF value type ids and ggml tensor type ids (gguf/constants.py)
U8, U32, I32, F32, BOOL, STR, ARR, U64 = 0, 4, 5, 6, 7, 8, 9, 10
T_F32, T_Q8_0 = 0, 8
SECONDS = 30  # far beyond a check's cost; only a hang reaches it


class StillRunning(BaseException):
    """A hang cut short; a BaseException so that no ``except Exception`` (the CLI's one-line
    report included) can turn it into a pass."""


@contextmanager
def bounded(seconds: int = SECONDS) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block runs past ``seconds``."""

    def stop(signum: int, frame: Any) -> None:
        raise StillRunning(f"still running after {seconds} s: the file's claims were trusted")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- byte builders
def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, type_id: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", type_id) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STR, gstr(value))


def kv_array(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    return kv(key, ARR, struct.pack("<IQ", item_type, count) + items)


def tensor_info(name: str, dims: tuple[int, ...], type_id: int = T_F32, offset: int = 0) -> bytes:
    head = gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
    return head + struct.pack("<IQ", type_id, offset)


def gguf_bytes(
    kvs: list[bytes],
    infos: list[bytes] = (),  # type: ignore[assignment]
    data: bytes = b"",
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> bytes:
    """A version-3 little-endian GGUF file; tensor data starts at the next multiple of 32."""
    counts = struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors,
                         len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = b"GGUF" + struct.pack("<I", 3) + counts + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32 if infos else 0) + data


def write(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


ONE_F32 = [tensor_info("token_embd.weight", (4, 2))]  # 8 floats = 32 bytes at offset 0

# name -> (file bytes, words the one-line error must contain)
STRUCTURE_CASES: dict[str, tuple[bytes, list[str]]] = {
    "array claims 2**40 elements (a 49-byte file)": (
        gguf_bytes([kv_array("a", U32, 1 << 40)]),
        ["'a'", "array length is 1099511627776", "remain"],
    ),
    "string array claims 2**40 strings": (
        gguf_bytes([kv_array("tokenizer.ggml.tokens", STR, 1 << 40, gstr("x"))]),
        ["'tokenizer.ggml.tokens'", "array length is 1099511627776"],
    ),
    "a string inside an array claims 2**60 bytes": (
        gguf_bytes(
            [kv_array("tokenizer.ggml.tokens", STR, 2, gstr("x") + struct.pack("<Q", 1 << 60))]
        ),
        ["a string of metadata key 'tokenizer.ggml.tokens'", str(1 << 60), "remain"],
    ),
    "an array's strings end before its length": (
        gguf_bytes([kv_array("general.tags", STR, 3, gstr("x" * 20) + gstr("y" * 20))]),
        ["a string of metadata key 'general.tags'", "needs 8 bytes", "0 remain"],
    ),
    "string claims 2**60 bytes": (
        gguf_bytes([kv("general.name", STR, struct.pack("<Q", 1 << 60) + b"abc")]),
        ["'general.name'", str(1 << 60)],
    ),
    "key length claims 2**62 bytes": (
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 62) + b"k" * 16,
        ["metadata key 0", str(1 << 62)],
    ),
    "key count 2**62": (
        gguf_bytes([kv_u32("a", 1)], n_kv=1 << 62),
        ["metadata key count is 4611686018427387904"],
    ),
    "tensor count 2**62": (
        gguf_bytes([kv_u32("a", 1)], n_tensors=1 << 62),
        ["tensor count is 4611686018427387904"],
    ),
    "n_dims 2**31": (
        gguf_bytes([], [gstr("t") + struct.pack("<I", 1 << 31) + b"\0" * 32]),
        ["tensor 't'", "2147483648 dimensions", "at most 4"],
    ),
    "dimensions of 2**40 x 2**20 floats": (
        gguf_bytes([], [tensor_info("t", (1 << 40, 1 << 20))], b"\0" * 64),
        ["tensor 't'", "past the end of the file"],
    ),
    "data offset past the end": (
        gguf_bytes([], [tensor_info("t", (4, 2), offset=1 << 62)], b"\0" * 32),
        ["tensor 't'", "past the end of the file"],
    ),
    "tensor data cut short": (
        gguf_bytes([], ONE_F32, b"\0" * 31),
        ["tensor 'token_embd.weight'", "past the end of the file"],
    ),
    "header cut inside a key": (
        gguf_bytes([kv_u32("general.alignment", 32)])[:40],
        ["truncated or corrupt", "remain"],
    ),
    "misaligned data offset": (
        gguf_bytes([], [tensor_info("t", (4, 2), offset=1)], b"\0" * 64),
        ["tensor 't'", "data offset 1", "general.alignment=32"],
    ),
    "offset aligned to 32 but not to general.alignment 64": (
        gguf_bytes(
            [kv_u32("general.alignment", 64)], [tensor_info("t", (4, 2), offset=32)], b"\0" * 128
        ),  # fmt: skip
        ["data offset 32", "general.alignment=64"],
    ),
    "alignment not a power of two": (
        gguf_bytes([kv_u32("general.alignment", 48)]),
        ["general.alignment=48 is not a power of two"],
    ),
    "alignment zero": (
        gguf_bytes([kv_u32("general.alignment", 0)]),
        ["general.alignment=0 is not a power of two"],
    ),
    "alignment of the wrong type": (
        gguf_bytes([kv("general.alignment", U64, struct.pack("<Q", 32))]),
        ["general.alignment is uint64, not uint32"],
    ),
    "array of arrays": (
        gguf_bytes([kv_array("a", ARR, 1, struct.pack("<IQ", U32, 0))]),
        ["'a'", "array of unsupported type 9"],
    ),
    "unknown value type": (
        gguf_bytes([kv("a", 99, b"\0" * 8)]),
        ["'a'", "unknown value type 99"],
    ),
    "duplicate key": (
        gguf_bytes([kv_u32("a", 1), kv_u32("a", 2)]),
        ["metadata key 'a' appears twice"],
    ),
    "duplicate tensor": (
        gguf_bytes([], [tensor_info("t", (8,)), tensor_info("t", (8,), offset=32)], b"\0" * 64),
        ["tensor 't' appears twice"],
    ),
    "unknown tensor type": (
        gguf_bytes([], [tensor_info("t", (8,), type_id=77)], b"\0" * 32),
        ["tensor 't'", "unknown tensor type 77"],
    ),
    "q8_0 row not a whole number of blocks": (
        gguf_bytes([], [tensor_info("t", (33, 1), type_id=T_Q8_0)], b"\0" * 64),
        ["tensor 't'", "Q8_0", "first dimension 33", "block size 32"],
    ),
    "key that is not UTF-8": (
        gguf_bytes([gstr(b"\xff\xfe") + struct.pack("<II", U32, 1)]),
        ["metadata key 0", "not UTF-8"],
    ),
    "version 1": (
        b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        ["GGUF version 1 is not supported"],
    ),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_structure_claims_are_bounded_by_the_file(tmp_path, case: str) -> None:
    content, words = STRUCTURE_CASES[case]
    path = write(tmp_path, "hostile.gguf", content)
    with bounded(), pytest.raises(FormatError) as info:
        load_gguf(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_the_49_byte_file_is_refused_by_every_reader(tmp_path) -> None:
    """load_gguf, the adapter reader and the tokenizer conversion all check the file first."""
    path = write(tmp_path, "a.gguf", gguf_bytes([kv_array("a", U32, 1 << 40)]))
    assert path.stat().st_size == 49
    for read in (
        load_gguf,
        load_gguf_tokenizer,
        lambda p: loraq.load_gguf_adapter(tiny_llama(), p),
    ):
        with bounded(), pytest.raises(FormatError, match=r"a\.gguf: truncated or corrupt.*'a'"):
            read(path)


# ------------------------------------------------------------------ a good file, rewritten
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny f32 Llama GGUF (2 blocks, hidden 32, 4 heads of 8, 2 kv heads, vocab 64)."""
    tmp = tmp_path_factory.mktemp("good_gguf")
    torch.manual_seed(0)
    return export_gguf(tiny_llama(), tmp / "good.gguf", merged=True, dtype="f32")


def rewrite(good: Path, out: Path, changes: dict[str, tuple | None]) -> Path:
    """``good`` with metadata keys replaced (``key: (value, GGUFValueType[, sub_type])``),
    added, or removed (``key: None``); the tensors are copied unchanged."""
    reader = gguf.GGUFReader(good)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changes:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for key, change in changes.items():
        if change is not None:
            writer.add_key_value(key, *change)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


V = gguf.GGUFValueType
TOKENS = (["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(61))], V.ARRAY, V.STRING)
# name -> (metadata changes, words the error must contain)
HYPERPARAMETER_CASES: dict[str, tuple[dict[str, tuple | None], list[str]]] = {
    "block_count 2**31": (
        {"llama.block_count": (1 << 31, V.UINT32)},
        ["'llama.block_count' is 2147483648, outside [1, 4096]"],
    ),
    "block_count above the file's blocks": (
        {"llama.block_count": (3, V.UINT32)},
        ["'llama.block_count' is 3", "blocks 0..1 (2)"],
    ),
    "block_count missing": ({"llama.block_count": None}, ["'llama.block_count' is missing"]),
    "head_count 0": (
        {"llama.attention.head_count": (0, V.UINT32)},
        ["'llama.attention.head_count' is 0, outside"],
    ),
    "head_count a string": (
        {"llama.attention.head_count": ("4", V.STRING)},
        ["'llama.attention.head_count' must be an integer, got '4'"],
    ),
    "head_count a bool": (
        {"llama.attention.head_count": (True, V.BOOL)},
        ["'llama.attention.head_count' must be an integer"],
    ),
    "head_count against the q rows": (
        {"llama.attention.head_count": (2, V.UINT32)},
        ["llama.attention.head_count=2 heads of size 8 make 16 rows", "'blk.0.attn_q.weight'"],
    ),
    "head_count_kv not dividing head_count": (
        {"llama.attention.head_count_kv": (3, V.UINT32)},
        ["'llama.attention.head_count_kv' is 3, which does not divide"],
    ),
    "embedding_length against token_embd": (
        {"llama.embedding_length": (64, V.UINT32)},
        ["'llama.embedding_length' is 64", "'token_embd.weight'"],
    ),
    "feed_forward_length 2**40": (
        {"llama.feed_forward_length": (1 << 40, V.UINT64)},
        ["'llama.feed_forward_length' is 1099511627776, outside"],
    ),
    "odd head size": (
        {"llama.attention.key_length": (7, V.UINT32)},
        ["head size 7", "must be even"],
    ),
    "rms epsilon NaN": (
        {"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)},
        ["'llama.attention.layer_norm_rms_epsilon'", "nan"],
    ),
    "rope base a string": (
        {"llama.rope.freq_base": ("1e4", V.STRING)},
        ["'llama.rope.freq_base' must be a number > 0"],
    ),
    "eos id outside the vocabulary": (
        {"tokenizer.ggml.eos_token_id": (1 << 30, V.UINT32)},
        ["'tokenizer.ggml.eos_token_id' is 1073741824, outside [0, 63]"],
    ),
    "tokenizer without vocabulary": (
        {"tokenizer.ggml.model": ("llama", V.STRING)},
        ["names a tokenizer", "'tokenizer.ggml.tokens'", "missing"],
    ),
    "vocabulary of integers": (
        {
            "tokenizer.ggml.model": ("llama", V.STRING),
            "tokenizer.ggml.tokens": ([1, 2], V.ARRAY, V.UINT32),
        },
        ["'tokenizer.ggml.tokens'", "array[uint32]"],
    ),
    "vocabulary longer than the embedding": (
        {
            "tokenizer.ggml.model": ("llama", V.STRING),
            "tokenizer.ggml.tokens": ([f"t{i}" for i in range(65)], V.ARRAY, V.STRING),
        },
        ["65 tokens", "64 rows"],
    ),
    "byte-level merge without a space": (
        {
            "tokenizer.ggml.model": ("gpt2", V.STRING),
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.merges": (["t1 t2", "t1t2"], V.ARRAY, V.STRING),
        },
        ["'tokenizer.ggml.merges' entry 1", "'t1t2'", "not 'left right'"],
    ),
    "byte-level merges of integers": (
        {
            "tokenizer.ggml.model": ("gpt2", V.STRING),
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.merges": ([1, 2], V.ARRAY, V.UINT32),
        },
        ["'tokenizer.ggml.merges' must be array[string], not array[uint32]"],
    ),
    "scores shorter than the vocabulary": (
        {
            "tokenizer.ggml.model": ("llama", V.STRING),
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.scores": ([0.0] * 3, V.ARRAY, V.FLOAT32),
        },
        ["'tokenizer.ggml.scores'", "array[float32] of 64 values", "of 3"],
    ),
}


@pytest.mark.parametrize("case", list(HYPERPARAMETER_CASES))
def test_hyperparameters_are_checked_before_the_model_is_built(tmp_path, good, case) -> None:
    changes, words = HYPERPARAMETER_CASES[case]
    path = rewrite(good, tmp_path / "bad.gguf", changes)
    with bounded(), pytest.raises(FormatError) as info:
        load_gguf(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, (word, message)


def test_rewrite_keeps_a_good_file_good(tmp_path, good) -> None:
    """The control: the rewriting itself breaks nothing."""
    model, tokenizer = load_gguf(rewrite(good, tmp_path / "same.gguf", {}))
    assert model.config.num_hidden_layers == 2 and tokenizer is None


def shifted(good: Path, out: Path, by: int) -> Path:
    """``good`` with its last tensor's data offset moved by ``by`` bytes (the file extended so
    the shifted tensor still lies inside it)."""
    out.write_bytes(good.read_bytes() + b"\0" * 64)
    reader = gguf.GGUFReader(out, "r+")
    offset = reader.tensors[-1].field.parts[5]  # a view of the file's bytes
    offset[0] = int(offset[0]) + by
    reader.data.flush()
    del reader
    return out


def test_a_misaligned_tensor_is_refused_not_read_one_byte_shifted(tmp_path, good) -> None:
    name = gguf.GGUFReader(good).tensors[-1].name
    with bounded(), pytest.raises(FormatError) as info:
        load_gguf(shifted(good, tmp_path / "shift.gguf", 1))
    assert f"tensor {name!r} has data offset" in str(info.value)
    assert "not a multiple of general.alignment=32" in str(info.value)
    load_gguf(shifted(good, tmp_path / "aligned.gguf", 32))  # the control: aligned is read


# ----------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_adapter_gguf_is_refused_and_the_model_unchanged(tmp_path, bad):
    torch.manual_seed(0)
    base = tiny_llama()
    adapted = loraq.apply(tiny_llama(), loraq.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    good = export_gguf(adapted, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(good)
    writer = gguf.GGUFWriter(tmp_path / "nan.gguf", "llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            writer.add_key_value(key, field.contents(), field.types[0])
    poisoned = sorted(t.name for t in reader.tensors)[1]
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == poisoned:
            data.flat[3] = bad
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(FormatError, match=rf"nan\.gguf: tensor '{poisoned}' holds NaN or Inf"):
        loraq.load_gguf_adapter(base, tmp_path / "nan.gguf")
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    loraq.load_gguf_adapter(base, good)  # the control: the clean file loads


# ------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def hostile(tmp_path_factory, good) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile_cli")
    files = {
        "huge array": write(tmp, "huge.gguf", gguf_bytes([kv_array("a", U32, 1 << 40)])),
        "truncated": write(tmp, "cut.gguf", good.read_bytes()[: good.stat().st_size // 2]),
        "block_count 2**31": rewrite(
            good, tmp / "blocks.gguf", HYPERPARAMETER_CASES["block_count 2**31"][0]
        ),
        "no vocabulary": rewrite(
            good, tmp / "novocab.gguf", {"tokenizer.ggml.model": ("llama", V.STRING)}
        ),
    }
    data = write_pattern_jsonl(tmp / "data.jsonl", n=4)
    files["config"] = write_config(
        tmp / "train.yaml",
        {
            "model": {"path": str(files["truncated"]), "task": "causal-lm"},
            "data": {"train": str(data), "max_length": 32},
            "training": {"max_steps": 1, "progress": False, "output_dir": str(tmp / "run")},
        },
    )
    return files


COMMANDS: dict[str, Callable[[Path, dict[str, Path]], list[str]]] = {
    "generate": lambda bad, f: ["generate", "--model", str(bad), "hi"],
    "train": lambda bad, f: ["train", str(f["config"]), "--model.path", str(bad)],
    "serve": lambda bad, f: ["serve", "--base", str(bad), "--port", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("file", ["huge array", "truncated", "block_count 2**31", "no vocabulary"])
def test_cli_reports_a_hostile_gguf_in_one_line(hostile, command, file, capsys) -> None:
    argv = COMMANDS[command](hostile[file], hostile)
    with bounded():
        code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"loraq {command}: error: "), lines[0]
    assert hostile[file].name in lines[0], lines[0]


# ------------------------------------------------------------ good files pass, as the reader sees them
def layout_as_the_reader_sees_it(path: Path) -> list[tuple]:
    reader = gguf.GGUFReader(path)
    return [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]


@pytest.mark.parametrize("dtype", ["f32", "q8_0", "q4_0"])
def test_the_checked_layout_agrees_with_the_gguf_reader(tmp_path, dtype) -> None:
    from loraq.io.gguf_header import check_gguf_layout

    torch.manual_seed(0)
    path = export_gguf(tiny_llama(hidden=64), tmp_path / "m.gguf", merged=True, dtype=dtype)
    layout = check_gguf_layout(path)
    ours = [
        (t.name, t.type_name, t.dims, layout.data_start + t.offset, t.nbytes)
        for t in layout.tensors
    ]
    assert ours == layout_as_the_reader_sees_it(path)
    assert (layout.version, layout.byte_order, layout.alignment) == (3, "<", 32)
    assert layout.value_types["llama.block_count"] == "uint32"


def test_a_big_endian_file_with_its_own_alignment_is_read(tmp_path) -> None:
    from loraq.io.gguf_header import check_gguf_layout

    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_custom_alignment(64)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", ""])
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 4])
    writer.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b", np.ones((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layout = check_gguf_layout(path)
    assert (layout.byte_order, layout.alignment) == (">", 64)
    assert layout.array_lengths == {"tokenizer.ggml.tokens": 3, "tokenizer.ggml.token_type": 3}
    full = check_gguf_layout(path, ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
    assert full.values["tokenizer.ggml.tokens"] == ["a", "bc", ""]
    assert full.values["tokenizer.ggml.token_type"] == [1, 3, 4]  # read big-endian
    ours = [
        (t.name, t.type_name, t.dims, layout.data_start + t.offset, t.nbytes)
        for t in layout.tensors
    ]
    assert ours == layout_as_the_reader_sees_it(path)


def test_damaged_headers_end_as_format_errors(tmp_path, good) -> None:
    """Random damage to the header and metadata (seeded, with random cuts) loads or raises
    FormatError naming the file: never another exception, never a hang."""
    import random

    content = good.read_bytes()
    header_end = gguf.GGUFReader(good).data_offset
    rng = random.Random(0)
    refused = 0
    for i in range(60):
        damaged = bytearray(content)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, header_end)
            damaged[pos] = rng.choice([0, 0xFF, rng.randrange(256), damaged[pos] ^ 0x80])
        if rng.random() < 0.2:
            damaged = damaged[: rng.randrange(len(damaged))]
        path = write(tmp_path, f"damaged{i}.gguf", bytes(damaged))
        with bounded():
            try:
                load_gguf(path)
            except FormatError as err:
                assert str(err).startswith(str(path)), err
                refused += 1
    assert refused > 30  # the damage is real: most files are refused
