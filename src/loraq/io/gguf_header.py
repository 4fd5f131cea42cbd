"""Check a GGUF file's structure against its own size before any reader trusts it.

A GGUF file starts with counts and lengths that a reader loops over or allocates from: the
tensor and key counts, every string's length, every array's element count, each tensor's
number of dimensions, its dimensions and its data offset. The ``gguf`` package's reader (and
transformers' tokenizer conversion, which uses it) believes them: a 49-byte file whose array
claims 2**40 elements makes it loop 2**40 times. :func:`check_gguf_layout` walks the same
structure with ``struct`` over a read-only memory map and compares each claim with the bytes
that remain *before* it is looped over, so the walk is bounded by the file's size and
allocates nothing in proportion to a claim. It also applies llama.cpp's rules (``gguf.cpp``):
versions 2 and 3, no nested arrays, no duplicate keys or tensor names, at most 4 dimensions,
a known tensor type whose first dimension is a whole number of blocks, ``general.alignment``
a power-of-two uint32 (default 32) and every tensor's data offset a multiple of it, inside
the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .safe import FormatError

__all__ = [
    "DEFAULT_ALIGNMENT",
    "GGUF_MAGIC",
    "GGUFLayout",
    "MAX_DIMS",
    "SMALL_ARRAY_ITEMS",
    "SUPPORTED_VERSIONS",
    "TensorLayout",
    "check_gguf_layout",
]

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: File versions llama.cpp and the ``gguf`` reader read (1 had 32-bit counts).
SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3)
#: Alignment of tensor data when ``general.alignment`` is absent (llama.cpp's GGUF_DEFAULT_ALIGNMENT).
DEFAULT_ALIGNMENT = 32
#: The most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
MAX_DIMS = 4
#: Arrays of at most this many elements are read into :attr:`GGUFLayout.values` (hyperparameters
#: such as per-layer head counts); longer ones (the vocabulary) are only bounds-checked.
SMALL_ARRAY_ITEMS = 64
_ALIGNMENT_KEY = "general.alignment"

# GGUF value type id -> (name, struct code); STRING and ARRAY are read separately.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    7: ("bool", "B"),
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
_STRING, _ARRAY = 8, 9
_LENGTH_BYTES = 8  # every string and array length is a uint64
# The fewest bytes one entry can take, to bound a count before looping over it:
_MIN_KV_BYTES = _LENGTH_BYTES + 4 + 1  # key length, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = _LENGTH_BYTES + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class TensorLayout:
    """One tensor's entry in the file: ``dims`` in GGUF order (fastest-varying first)."""

    name: str
    type_name: str
    dims: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What :func:`check_gguf_layout` found: every count checked against the file's size.

    ``value_types`` maps each metadata key to its GGUF type name (``"uint32"``, ``"string"``,
    ``"array[string]"``, ...), ``array_lengths`` each array key to its element count and
    ``values`` each key to its value (bools as bool, strings decoded as UTF-8 with invalid bytes
    replaced, arrays of at most :data:`SMALL_ARRAY_ITEMS` elements as lists; longer arrays left
    out), so a model loads without a second parse of the file.
    """

    version: int
    byte_order: str  # "<" little-endian, ">" big-endian
    alignment: int
    data_start: int
    file_size: int
    value_types: dict[str, str]
    array_lengths: dict[str, int]
    tensors: tuple[TensorLayout, ...]
    values: dict[str, Any]


class _Cursor:
    """Reads the header front to back; every read is refused if it would pass the end."""

    def __init__(self, buffer: Any, size: int, source: str) -> None:
        self.buffer, self.size, self.pos, self.source = buffer, size, 0, source
        self.order = "<"

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.source}: truncated or corrupt GGUF file ({what})")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(f"{what} needs {n} bytes at byte {self.pos}; {self.remaining} remain")
        self.pos += n

    def read(self, code: str, what: str) -> Any:
        start = self.pos
        self.skip(struct.calcsize(code), what)
        return struct.unpack_from(self.order + code, self.buffer, start)[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A uint64 count of items of at least ``min_item_bytes`` each that must fit the rest."""
        n = self.read("Q", what)
        if n * min_item_bytes > self.remaining:
            raise self.fail(
                f"{what} is {n}, which needs at least {n * min_item_bytes} bytes at byte "
                f"{self.pos}; {self.remaining} remain"
            )
        return n

    def raw_string(self, what: str) -> bytes:
        start = self.skip_string(what)
        return bytes(self.buffer[start : self.pos])

    def skip_string(self, what: str) -> int:
        """Move past a length-prefixed string (its length checked first); return its start."""
        n = self.count(f"length of {what}", 1)
        start = self.pos
        self.pos += n
        return start

    def text(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} {raw[:40]!r} is not UTF-8") from None


def _scalar(cursor: _Cursor, type_id: int, what: str) -> Any:
    name, code = _SCALARS[type_id]
    value = cursor.read(code, what)
    return bool(value) if name == "bool" else value


def _string(cursor: _Cursor, what: str) -> str:
    return cursor.raw_string(what).decode("utf-8", errors="replace")


def _strings(cursor: _Cursor, n: int, item: str, keep: bool) -> list[str] | None:
    """``n`` length-prefixed strings (decoded as :func:`_string` does when ``keep``, else only
    skipped, each length checked against the file first); the cursor moves past them. One
    tight loop: a vocabulary holds about 100,000 of them."""
    buffer, size, pos = cursor.buffer, cursor.size, cursor.pos
    length_at = struct.Struct(cursor.order + "Q").unpack_from
    out: list[str] = []
    for _ in range(n):
        start = pos + _LENGTH_BYTES
        if start <= size:
            (length,) = length_at(buffer, pos)
            if length <= size - start:
                if keep:
                    out.append(str(buffer[start : start + length], "utf-8", "replace"))
                pos = start + length
                continue
        cursor.pos = pos
        cursor.skip_string(item)  # raises, naming the string and the bytes left
        raise cursor.fail(f"{item} does not fit the file")
    cursor.pos = pos
    return out if keep else None


def _value(
    cursor: _Cursor, key: str, type_id: int, lengths: dict[str, int], full: bool = False
) -> tuple[str, Any]:
    """(type name, value; None for an array over :data:`SMALL_ARRAY_ITEMS` elements unless
    ``full``); the cursor moves past the value."""
    what = f"metadata key {key!r}"
    if type_id in _SCALARS:
        return _SCALARS[type_id][0], _scalar(cursor, type_id, what)
    if type_id == _STRING:
        return "string", _string(cursor, what)
    if type_id != _ARRAY:
        raise cursor.fail(f"{what} has unknown value type {type_id}")
    item_type = cursor.read("I", f"{what}: array type")
    if item_type == _STRING:
        n = cursor.count(f"{what}: array length", _LENGTH_BYTES)
        value = _strings(cursor, n, f"a string of {what}", n <= SMALL_ARRAY_ITEMS or full)
        item_name = "string"
    elif item_type in _SCALARS:
        item_name, code = _SCALARS[item_type]
        itemsize = struct.calcsize(code)
        n = cursor.count(f"{what}: array length", itemsize)
        if n <= SMALL_ARRAY_ITEMS or full:
            start = cursor.pos
            cursor.skip(n * itemsize, what)
            value = list(struct.unpack_from(f"{cursor.order}{n}{code}", cursor.buffer, start))
            if item_name == "bool":
                value = [bool(v) for v in value]
        else:
            value = None
            cursor.skip(n * itemsize, what)
    else:  # llama.cpp refuses arrays of arrays too
        raise cursor.fail(f"{what} is an array of unsupported type {item_type}")
    lengths[key] = n
    return f"array[{item_name}]", value


def _tensor_info(cursor: _Cursor, index: int, quant_sizes: dict) -> TensorLayout:
    name = cursor.text(f"name of tensor {index}")
    what = f"tensor {name!r}"
    n_dims = cursor.read("I", f"{what}: n_dims")
    if n_dims > MAX_DIMS:
        raise cursor.fail(f"{what} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
    dims = tuple(cursor.read("Q", f"{what}: dimensions") for _ in range(n_dims))
    type_id = cursor.read("I", f"{what}: type")
    offset = cursor.read("Q", f"{what}: data offset")
    if type_id not in quant_sizes:
        raise cursor.fail(f"{what} has unknown tensor type {type_id}")
    type_name, (block, type_size) = quant_sizes[type_id]
    if dims and dims[0] % block:
        raise cursor.fail(
            f"{what} of type {type_name} has a first dimension {dims[0]} that is not a "
            f"multiple of its block size {block}"
        )
    n_elements = 1
    for d in dims:
        n_elements *= d
    return TensorLayout(name, type_name, dims, offset, n_elements // block * type_size)


def _quant_sizes() -> dict[int, tuple[str, tuple[int, int]]]:
    """ggml type id -> (name, (block size in values, block size in bytes))."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError as err:  # pragma: no cover - the extra is missing
        raise ImportError("reading GGUF needs the gguf package: pip install 'loraq[gguf]'") from err
    return {int(t): (t.name, sizes) for t, sizes in GGML_QUANT_SIZES.items()}


def _checked_alignment(cursor: _Cursor, value_types: dict[str, str], alignment: Any) -> int:
    if _ALIGNMENT_KEY not in value_types:
        return DEFAULT_ALIGNMENT
    if value_types[_ALIGNMENT_KEY] != "uint32":
        raise cursor.fail(f"{_ALIGNMENT_KEY} is {value_types[_ALIGNMENT_KEY]}, not uint32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise cursor.fail(f"{_ALIGNMENT_KEY}={alignment} is not a power of two")
    return int(alignment)


def _walk(cursor: _Cursor, full_arrays: frozenset[str] = frozenset()) -> GGUFLayout:
    if bytes(cursor.buffer[:4]) != GGUF_MAGIC:
        raise FormatError(
            f"{cursor.source}: not a GGUF file (starts with {bytes(cursor.buffer[:4])!r}, "
            f"expected {GGUF_MAGIC!r})"
        )
    cursor.skip(4, "magic")
    version = cursor.read("I", "version")
    if version & 0xFFFF == 0 and version:  # written on a big-endian machine
        cursor.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(
            f"{cursor.source}: GGUF version {version} is not supported (loraq reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    # Both counts are read before either is bounded, as the file lays them out.
    n_tensors = cursor.read("Q", "tensor count")
    n_kv = cursor.count("metadata key count", _MIN_KV_BYTES)
    if n_tensors * _MIN_TENSOR_INFO_BYTES > cursor.remaining:
        raise cursor.fail(
            f"tensor count is {n_tensors}, which needs at least "
            f"{n_tensors * _MIN_TENSOR_INFO_BYTES} bytes; {cursor.remaining} remain"
        )
    value_types: dict[str, str] = {}
    lengths: dict[str, int] = {}
    values: dict[str, Any] = {}
    for index in range(n_kv):
        key = cursor.text(f"metadata key {index}")
        if key in value_types:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        type_id = cursor.read("I", f"metadata key {key!r}: type")
        value_types[key], value = _value(cursor, key, type_id, lengths, key in full_arrays)
        if value is not None:
            values[key] = value
    align = _checked_alignment(cursor, value_types, values.get(_ALIGNMENT_KEY))
    quant_sizes = _quant_sizes()
    tensors = [_tensor_info(cursor, i, quant_sizes) for i in range(n_tensors)]
    data_start = -(-cursor.pos // align) * align
    names: set[str] = set()
    for t in tensors:
        if t.name in names:
            raise cursor.fail(f"tensor {t.name!r} appears twice")
        names.add(t.name)
        if t.offset % align:
            raise cursor.fail(
                f"tensor {t.name!r} has data offset {t.offset}, not a multiple of "
                f"{_ALIGNMENT_KEY}={align} (llama.cpp refuses such files)"
            )
        end = data_start + t.offset + t.nbytes
        if end > cursor.size:
            raise cursor.fail(
                f"tensor {t.name!r} ({t.nbytes} bytes at data offset {t.offset}) ends at byte "
                f"{end}, past the end of the file ({cursor.size} bytes)"
            )
    return GGUFLayout(
        version,
        cursor.order,
        align,
        data_start,
        cursor.size,
        value_types,
        lengths,
        tuple(tensors),
        values,
    )


def check_gguf_layout(
    path: str | os.PathLike[str], full_arrays: Collection[str] = ()
) -> GGUFLayout:
    """The layout of the GGUF file at ``path``, every count, length, dimension and offset in it
    checked against the file's size (and llama.cpp's rules) before anything relies on it.
    The arrays named in ``full_arrays`` (a vocabulary, its merges) are read into ``values``
    whatever their length.

    Raises:
        FileNotFoundError: no such file. FormatError: naming the file and the key or tensor
            whose claim does not fit (``truncated or corrupt GGUF file (...)``), or not GGUF.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    source = str(path)
    with open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < len(GGUF_MAGIC):
            head = fh.read()
            if head != GGUF_MAGIC[: len(head)] or not head:
                raise FormatError(
                    f"{source}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})"
                )
            raise FormatError(f"{source}: truncated or corrupt GGUF file ({size} bytes)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _walk(_Cursor(buffer, size, source), frozenset(full_arrays))
