"""The hyperparameters of a GGUF model, checked before a model is built from them.

A model is built on the meta device from the file's ``{arch}.*`` keys before its tensors are
placed, so a key the tensors would contradict must be caught first: ``block_count = 2**31``
builds two billion layers, ``head_count = 0`` divides by zero, a string where an integer
belongs is not a count. Every key is checked for its type and a sane range, then against the
tensors that fix it (the number of ``blk.N`` blocks, the embedding width, the q/k/ffn rows of
block 0); the remaining tensors are checked against the built model, shape by shape. A
tokenizer (``tokenizer.ggml.model``) must come with its vocabulary. Each failure is one
:class:`FormatError` naming the file and the key.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .gguf_header import GGUFLayout, TensorLayout
from .gguf_names import Architecture, architecture
from .safe import FormatError

__all__ = ["HYPERPARAMETER_LIMITS", "check_vocabulary", "config_arguments", "model_config"]

#: ``{arch}.<key>`` -> the inclusive range an integer hyperparameter must lie in.
HYPERPARAMETER_LIMITS: dict[str, tuple[int, int]] = {
    "block_count": (1, 4096),
    "embedding_length": (1, 1 << 20),
    "feed_forward_length": (1, 1 << 20),
    "attention.head_count": (1, 1 << 14),
    "attention.head_count_kv": (1, 1 << 14),
    "attention.key_length": (2, 1 << 14),
    "context_length": (1, 1 << 24),
    "vocab_size": (1, 1 << 24),
    "attention.sliding_window": (1, 1 << 24),
}
_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_TOKEN_IDS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}
_VOCABULARY = "tokenizer.ggml.tokens"
# Arrays that run parallel to the vocabulary, with the element type each must have.
_PER_TOKEN = {
    "tokenizer.ggml.scores": "array[float32]",
    "tokenizer.ggml.token_type": "array[int32]",
}
_BLOCK = re.compile(r"^blk\.(\d{1,9})\.")  # more digits than any block count: no block


def _integer(meta: dict[str, Any], key: str, source: str, limits: tuple[int, int]) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{source}: metadata key {key!r} must be an integer, got {value!r}")
    low, high = limits
    if not low <= value <= high:
        raise FormatError(f"{source}: metadata key {key!r} is {value}, outside [{low}, {high}]")
    return value


def _positive_float(meta: dict[str, Any], key: str, source: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FormatError(f"{source}: metadata key {key!r} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise FormatError(f"{source}: metadata key {key!r} must be finite, got {value!r}")
    return float(value)


def _tensor(layout: GGUFLayout, name: str) -> TensorLayout | None:
    return next((t for t in layout.tensors if t.name == name), None)


def _matches(source: str, claim: str, value: int, tensor: TensorLayout | None, axis: int) -> None:
    """``value`` (what ``claim`` says) equals the tensor's GGUF dimension ``axis``, when the
    file has the tensor."""
    if tensor is None or len(tensor.dims) <= axis or tensor.dims[axis] == value:
        return
    raise FormatError(
        f"{source}: {claim} but tensor {tensor.name!r} has dimensions {list(tensor.dims)}"
    )


def _checked_blocks(layout: GGUFLayout, key: str, blocks: int, source: str) -> None:
    indices = {int(m.group(1)) for t in layout.tensors if (m := _BLOCK.match(t.name))}
    if indices != set(range(blocks)):
        found = f"blocks {min(indices)}..{max(indices)} ({len(indices)})" if indices else "none"
        raise FormatError(
            f"{source}: metadata key {key!r} is {blocks} but the file's blk.N tensors cover {found}"
        )


def _vocab_rows(layout: GGUFLayout) -> int | None:
    embedding = _tensor(layout, "token_embd.weight")
    return embedding.dims[1] if embedding is not None and len(embedding.dims) == 2 else None


def _architecture(meta: dict[str, Any], source: str) -> str:
    arch = meta.get("general.architecture")
    if arch is None:
        raise FormatError(f"{source}: metadata key 'general.architecture' is missing")
    architecture(str(arch), source)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise FormatError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported")
    return arch


def _checked_integers(meta: dict[str, Any], arch: str, source: str) -> dict[str, int]:
    """``HYPERPARAMETER_LIMITS`` key -> value for the keys the file has, each in range, plus
    ``head_count_kv`` and ``key_length`` filled in and consistent with the head count."""
    for name in _REQUIRED:
        if f"{arch}.{name}" not in meta:
            raise FormatError(f"{source}: metadata key '{arch}.{name}' is missing")
    h = {
        name: _integer(meta, f"{arch}.{name}", source, limits)
        for name, limits in HYPERPARAMETER_LIMITS.items()
        if f"{arch}.{name}" in meta
    }
    n_head, hidden = h["attention.head_count"], h["embedding_length"]
    n_kv = h.setdefault("attention.head_count_kv", n_head)
    if n_head % n_kv:
        raise FormatError(
            f"{source}: metadata key '{arch}.attention.head_count_kv' is {n_kv}, which does not "
            f"divide {arch}.attention.head_count={n_head}"
        )
    head_dim = h.setdefault("attention.key_length", hidden // n_head)
    if head_dim < 2 or head_dim % 2:
        raise FormatError(
            f"{source}: head size {head_dim} ({arch}.embedding_length={hidden} / "
            f"{arch}.attention.head_count={n_head}, or {arch}.attention.key_length) must be even"
        )
    return h


def _checked_against_tensors(
    layout: GGUFLayout, row: Architecture, h: dict[str, int], source: str
) -> None:
    """The block count, widths and head counts agree with the tensors that fix them."""
    arch = row.name
    _checked_blocks(layout, f"{arch}.block_count", h["block_count"], source)
    head_dim = h["attention.key_length"]
    hidden, ffn = h["embedding_length"], h["feed_forward_length"]
    up_rows = 2 * ffn if row.fused_gate_up else ffn  # Phi-3's ffn_up holds gate and up
    for key, value, tensor, axis in (
        (f"metadata key '{arch}.embedding_length' is {hidden}", hidden, "token_embd.weight", 0),
        (f"metadata key '{arch}.feed_forward_length' is {ffn}", up_rows, "blk.0.ffn_up.weight", 1),
    ):
        _matches(source, key, value, _tensor(layout, tensor), axis)
    for key, tensor in (
        ("head_count", "blk.0.attn_q.weight"),
        ("head_count_kv", "blk.0.attn_k.weight"),
    ):
        heads = h[f"attention.{key}"]
        claim = (
            f"{arch}.attention.{key}={heads} heads of size {head_dim} make {heads * head_dim} rows"
        )
        _matches(source, claim, heads * head_dim, _tensor(layout, tensor), 1)


def model_config(meta: dict[str, Any], layout: GGUFLayout, source: str) -> Any:
    """The transformers config of a GGUF model (its architecture's row of
    :data:`~loraq.io.gguf_names.ARCHITECTURES`), every hyperparameter checked first (its
    type, its range, and against the tensors), so that building the model is safe."""
    import transformers

    config_class, kwargs = config_arguments(meta, layout, source)
    return getattr(transformers, config_class)(**kwargs)


def config_arguments(
    meta: dict[str, Any], layout: GGUFLayout, source: str
) -> tuple[str, dict[str, Any]]:
    """``(transformers config class name, its keyword arguments)`` of a GGUF model, every
    hyperparameter checked as :func:`model_config` says (without importing transformers)."""
    arch = _architecture(meta, source)
    row = architecture(arch, source)
    h = _checked_integers(meta, arch, source)
    _checked_against_tensors(layout, row, h, source)
    eps_key = f"{arch}.attention.layer_norm_rms_epsilon"
    kwargs: dict[str, Any] = dict(
        vocab_size=h.get("vocab_size"),
        hidden_size=h["embedding_length"],
        intermediate_size=h["feed_forward_length"],
        num_hidden_layers=h["block_count"],
        num_attention_heads=h["attention.head_count"],
        num_key_value_heads=h["attention.head_count_kv"],
        head_dim=h["attention.key_length"],
        max_position_embeddings=h.get("context_length", 2048),
        rms_norm_eps=_positive_float(meta, eps_key, source, 1e-6),
        rope_theta=_positive_float(meta, f"{arch}.rope.freq_base", source, 10000.0),
        tie_word_embeddings=_tensor(layout, "output.weight") is None,
        **_token_ids(meta, _vocab_rows(layout), source),
    )
    kwargs.update(_row_hyperparameters(meta, row, h, source))
    if not row.config_head_dim:
        kwargs.pop("head_dim")
    if row.always_tied:
        kwargs["tie_word_embeddings"] = True
    return row.config_class, {k: v for k, v in kwargs.items() if v is not None}


def _row_hyperparameters(
    meta: dict[str, Any], row: Architecture, h: dict[str, int], source: str
) -> dict[str, Any]:
    """The config attributes of the architecture's own keys (each checked as its kind), and
    the ones llama.cpp derives from the head size."""
    head_dim = h["attention.key_length"]
    out: dict[str, Any] = dict.fromkeys(row.head_dim_attributes, head_dim)
    key = f"{row.name}.rope.dimension_count"
    if key in meta:
        dims = _integer(meta, key, source, (2, head_dim))
        if dims != head_dim and not row.partial_rotary:
            raise FormatError(
                f"{source}: metadata key {key!r} is {dims}, but {row.name} rotates whole heads "
                f"of {head_dim}"
            )
        if dims != head_dim:
            out["partial_rotary_factor"] = dims / head_dim
    for p in row.hyperparameters:
        key = f"{row.name}.{p.key}"
        if key not in meta:
            continue
        if p.kind is int:
            out[p.attribute] = _integer(meta, key, source, HYPERPARAMETER_LIMITS[p.key])
        else:
            out[p.attribute] = _positive_float(meta, key, source, 1.0)
    return out


def _token_ids(meta: dict[str, Any], rows: int | None, source: str) -> dict[str, int]:
    """The special token ids the file names, each an integer inside the vocabulary."""
    limit = (rows - 1) if rows else (1 << 24)
    return {
        name: _integer(meta, key, source, (0, limit))
        for name, key in _TOKEN_IDS.items()
        if key in meta
    }


def check_vocabulary(layout: GGUFLayout, source: str) -> None:
    """A file that names a tokenizer (``tokenizer.ggml.model``) holds its vocabulary: a string
    array no longer than the embedding has rows, with per-token arrays of the same length."""
    types, lengths = layout.value_types, layout.array_lengths
    if "tokenizer.ggml.model" not in types:
        return
    if types["tokenizer.ggml.model"] != "string":
        raise FormatError(
            f"{source}: metadata key 'tokenizer.ggml.model' must be a string, "
            f"not {types['tokenizer.ggml.model']}"
        )
    if types.get(_VOCABULARY) != "array[string]" or not lengths.get(_VOCABULARY):
        found = types.get(_VOCABULARY, "missing")
        raise FormatError(
            f"{source}: the file names a tokenizer but metadata key {_VOCABULARY!r} (its "
            f"vocabulary) is {found if found != 'array[string]' else 'empty'}"
        )
    n_tokens, rows = lengths[_VOCABULARY], _vocab_rows(layout)
    if rows is not None and n_tokens > rows:
        raise FormatError(
            f"{source}: metadata key {_VOCABULARY!r} has {n_tokens} tokens but "
            f"token_embd.weight has {rows} rows"
        )
    for key, kind in _PER_TOKEN.items():
        if key in types and (types[key] != kind or lengths[key] != n_tokens):
            raise FormatError(
                f"{source}: metadata key {key!r} must be {kind} of {n_tokens} values (one per "
                f"token), got {types[key]} of {lengths.get(key, 0)}"
            )
