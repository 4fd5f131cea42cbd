"""Read a GGUF model (llama.cpp's file) into a transformers model whose weights stay quantized.

``load_gguf(path)`` builds the transformers model on the meta device (no dense weights are
allocated), then puts each GGUF tensor in place: block-quantized matrices become
:class:`~loraq.layers.gguf.LinearGGUF` / :class:`~loraq.layers.gguf.EmbeddingGGUF` holding the
file's bytes (q/k rows put back in transformers' order), dense ones (norms, f32/f16/bf16
matrices) become ordinary frozen float32 parameters. Peak memory is about the file size.

The container's layout and metadata are read by :func:`~loraq.io.gguf_header.check_gguf_layout`
(every count bounded by the file's size). The tokenizer and chat template of a byte-level
vocabulary are built from that metadata (:mod:`loraq.io.gguf_byte_level`); other vocabularies
go through transformers' GGUF tokenizer conversion.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.gguf import EmbeddingGGUF, LinearGGUF
from ..model.targeting import set_submodule
from ..quant.formats import DENSE_GGUF_TYPES, GGUF, format_names
from ..quant.gguf_tensor import GGUFTensor
from .gguf_byte_level import VOCABULARY_ARRAYS, byte_level_tokenizer
from .gguf_header import (
    GGUF_MAGIC,
    SMALL_ARRAY_ITEMS,
    GGUFLayout,
    TensorLayout,
    check_gguf_layout,
)
from .gguf_hparams import check_vocabulary, config_arguments
from .gguf_names import architecture, gguf_to_hf_name, hf_row_order, permuted_heads
from .safe import FormatError

__all__ = [
    "GGUF_MAGIC",
    "ModelBuilder",
    "gguf_metadata",
    "gguf_model_file",
    "load_gguf",
    "load_gguf_tokenizer",
    "open_gguf",
    "read_gguf",
]

# ggml spells type names in capitals.
_DENSE_TYPES = tuple(t.upper() for t in DENSE_GGUF_TYPES)
_BLOCK_FORMATS = format_names(kind=GGUF)
# Tensors llama.cpp writes that transformers computes itself (precomputed RoPE factors).
_IGNORED_TENSORS = ("rope_freqs.weight",)


def gguf_model_file(path: str | os.PathLike[str]) -> Path | None:
    """The file a ``model.path`` names when it is a GGUF model, else None.

    Accepts ``some/file.gguf`` and ``pkg:PACKAGE/FILE.gguf``, a file shipped inside an installed
    Python package (found with ``importlib.util.find_spec``, without importing the package).
    """
    text = str(path)
    if not text.lower().endswith(".gguf"):
        return None
    if not text.startswith("pkg:"):
        return Path(text).expanduser()
    package, _, name = text[4:].partition("/")
    import importlib.util

    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text}: Python package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / name


def read_gguf(path: str | os.PathLike[str]) -> tuple[GGUFLayout, Any]:
    """``(layout, reader)``: the file's structure checked against its size by
    :func:`~loraq.io.gguf_header.check_gguf_layout`, then a ``gguf.GGUFReader`` over it.

    Raises FileNotFoundError, or FormatError naming the file if it is not valid GGUF.
    """
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the extra is missing
        raise ImportError("reading GGUF needs the gguf package: pip install 'loraq[gguf]'") from err
    layout = check_gguf_layout(path)  # before the reader loops over anything the file claims
    try:
        return layout, gguf.GGUFReader(Path(path))
    except Exception as err:  # the reader raises ValueError/IndexError/... on corrupt files
        raise FormatError(
            f"{path}: truncated or corrupt GGUF file ({type(err).__name__}: {err})"
        ) from None


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; FormatError naming the file if it is not valid GGUF."""
    return read_gguf(path)[1]


def gguf_metadata(reader: Any, skip_arrays_over: int = SMALL_ARRAY_ITEMS) -> dict[str, Any]:
    """Key -> value for the file's metadata (long arrays such as the vocabulary left out)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if len(field.data) > skip_arrays_over:
            continue
        try:
            out[key] = field.contents()
        except Exception as err:
            raise FormatError(f"metadata key {key!r} cannot be decoded ({err})") from None
    return out


def _check_tensor_type(name: str, type_name: str, source: str) -> None:
    """Refuse a tensor type loraq cannot hold (named with the tensor)."""
    if type_name in _DENSE_TYPES or type_name.lower() in _BLOCK_FORMATS:
        return
    raise FormatError(
        f"{source}: tensor {name!r} has type {type_name}; loraq reads "
        f"{', '.join(_DENSE_TYPES + tuple(q.upper() for q in _BLOCK_FORMATS))}"
    )


def tensor_value(t: Any, source: str) -> tuple[str, torch.Tensor, tuple[int, ...]]:
    """(format, data, logical shape): uint8 blocks for block formats, float32 otherwise."""
    type_name = t.tensor_type.name
    _check_tensor_type(t.name, type_name, source)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if type_name in _DENSE_TYPES:
        import gguf

        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        return "dense", torch.from_numpy(np.array(data, dtype=np.float32)), shape
    return type_name.lower(), torch.from_numpy(np.array(t.data, dtype=np.uint8)), shape


# Dense GGUF tensor types -> their stored element type (bf16 is read as uint16, then widened).
_DENSE_STORAGE = {"F32": "f4", "F16": "f2", "BF16": "u2"}


def _file_tensor(file: Any, layout: GGUFLayout, t: TensorLayout) -> tuple[str, torch.Tensor, tuple]:
    """(format, data, logical shape) of one tensor read straight from ``file`` into its own
    buffer: uint8 ``(rows, row_bytes)`` blocks, or float32 for the dense types. One copy of the
    bytes and no memory map kept alive, so peak memory stays near the file's size."""
    shape = tuple(reversed(t.dims))
    raw = torch.empty(t.nbytes, dtype=torch.uint8)
    file.seek(layout.data_start + t.offset)
    if file.readinto(raw.numpy()) != t.nbytes:  # the layout checked the size; a file cut since
        raise FormatError(f"{file.name}: tensor {t.name!r} is cut short (the file changed?)")
    if t.type_name in _DENSE_STORAGE:
        stored = np.dtype(_DENSE_STORAGE[t.type_name]).newbyteorder(layout.byte_order)
        values = raw.numpy().view(stored)
        if t.type_name == "BF16":  # bfloat16 is the high half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return "dense", torch.from_numpy(values.astype(np.float32)).reshape(shape), shape
    rows = math.prod(shape[:-1])
    return t.type_name.lower(), raw.view(*shape[:-1], t.nbytes // max(rows, 1)), shape


def _collect(
    path: str | os.PathLike[str], layout: GGUFLayout, arch: str, source: str
) -> dict[str, dict[str, tuple[str, torch.Tensor, tuple]]]:
    """HF module path -> {"weight"/"bias": (format, data, shape)}, read from the file."""
    modules: dict[str, dict[str, tuple[str, torch.Tensor, tuple]]] = {}
    with open(path, "rb", buffering=0) as file:
        for t in layout.tensors:
            if t.name in _IGNORED_TENSORS:
                continue
            stem, _, suffix = t.name.rpartition(".")
            module = gguf_to_hf_name(stem, arch)
            if module is None or suffix not in ("weight", "bias"):
                raise FormatError(f"{source}: tensor {t.name!r} has no place in a {arch} model")
            modules.setdefault(module, {})[suffix] = _file_tensor(file, layout, t)
    return modules


def _check_shape(name: str, got: tuple, expected: tuple, source: str) -> None:
    if tuple(got) != tuple(expected):
        raise FormatError(
            f"{source}: tensor for {name} has shape {tuple(got)}, the model expects {tuple(expected)}"
        )


def _build_linear(module: nn.Module, name: str, parts: dict, heads: int | None, source: str):
    fmt, data, shape = parts["weight"]
    _check_shape(name + ".weight", shape, module.weight.shape, source)
    if heads is not None:  # llama.cpp's interleaved q/k rows back to transformers' order
        data = data[hf_row_order(shape[0], heads)]
    bias_t = parts["bias"][1] if "bias" in parts else None
    if bias_t is not None and heads is not None:
        bias_t = bias_t[hf_row_order(shape[0], heads)]
    if fmt == "dense":
        new = nn.Linear(shape[1], shape[0], bias=bias_t is not None)
        new.weight = nn.Parameter(data, requires_grad=False)
        if bias_t is not None:
            new.bias = nn.Parameter(bias_t, requires_grad=False)
        return new
    return LinearGGUF(GGUFTensor(data, shape, torch.float32, fmt), bias_t)


def _scale_output(scale: float, module: nn.Module, args: Any, output: torch.Tensor):
    return output * torch.tensor(scale, dtype=output.dtype)


def _build_embedding(
    module: nn.Module, name: str, parts: dict, scale: float | None, source: str
) -> nn.Module:
    """The embedding (``scale``: transformers' scaled-embedding class, or a quantized table
    whose lookups are multiplied by ``scale``, as Gemma's are)."""
    fmt, data, shape = parts["weight"]
    _check_shape(name + ".weight", shape, module.weight.shape, source)
    if fmt == "dense":
        if scale is not None:
            new = type(module)(shape[0], shape[1], module.padding_idx, embed_scale=scale)
        else:
            new = nn.Embedding(shape[0], shape[1], padding_idx=module.padding_idx)
        new.weight = nn.Parameter(data, requires_grad=False)
        return new
    new = EmbeddingGGUF(GGUFTensor(data, shape, torch.float32, fmt), module.padding_idx)
    if scale is not None:
        new.register_forward_hook(functools.partial(_scale_output, scale))
    return new


def _tied_head(embedding: nn.Module) -> nn.Module:
    """The output head sharing the embedding's storage (GGUF files omit output.weight)."""
    if isinstance(embedding, EmbeddingGGUF):
        return LinearGGUF(embedding.qweight)
    head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    head.weight = embedding.weight
    return head


def _place(model: nn.Module, modules: dict, config: Any, arch: str, source: str) -> None:
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    row = architecture(arch)
    offset = row.norm_offset
    scale = config.hidden_size**0.5 if row.scaled_embedding else None
    for name, parts in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{source}: the model has no module {name}") from None
        if "weight" not in parts:
            raise FormatError(f"{source}: {name} has a bias but no weight tensor")
        if isinstance(module, nn.Embedding):
            new = _build_embedding(module, name, parts, scale, source)
        elif isinstance(module, nn.Linear):
            heads = permuted_heads(arch, name, n_head, n_kv)
            new = _build_linear(module, name, parts, heads, source)
        else:  # a norm: its single weight vector
            fmt, data, shape = parts["weight"]
            _check_shape(name + ".weight", shape, module.weight.shape, source)
            module.weight = nn.Parameter(data - offset, requires_grad=False)  # Gemma's w + 1
            continue
        set_submodule(model, name, new)
    if config.tie_word_embeddings:
        set_submodule(model, "lm_head", _tied_head(model.get_input_embeddings()))


def _materialize_computed(model: nn.Module, config: Any, source: str) -> None:
    """Rebuild modules whose tensors are computed, not stored (RoPE); refuse any other gap."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            set_submodule(model, name, type(module)(config=config))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if missing:
        raise FormatError(f"{source}: the GGUF file has no tensor for {', '.join(missing[:5])}")


#: ``build(config_class, config_arguments)``: a model skeleton to hold a GGUF file's tensors
#: (see :func:`load_gguf`), or None to use transformers' model.
ModelBuilder = Callable[[str, dict[str, Any]], "nn.Module | None"]


def load_gguf(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    build: ModelBuilder | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a GGUF file, its quantized tensors kept quantized.

    Supported architectures: the rows of :data:`loraq.io.gguf_names.ARCHITECTURES` (llama incl.
    SmolLM2, mistral, qwen2, qwen3, phi3, gemma2, gemma3). Tensors in the
    GGUF block formats of :mod:`loraq.quant.formats` (q8_0, q4_0, q4_1 and the k-quants) stay as
    the file's bytes (dequantized to ``dtype`` per matmul); F32/F16/BF16 tensors load as float32. The model is in eval mode,
    every parameter frozen, ready for :func:`loraq.apply`; ``model.loraq_gguf_path`` records
    the file. ``tokenizer`` is the file's vocabulary as a transformers tokenizer with the chat
    template (None when ``tokenizer=False`` or the file has none).

    The model is transformers' class for the architecture, unless ``build`` (called on the meta
    device with the transformers config class name and its checked arguments, ``vocab_size``
    set from the embedding) returns another with the same module names and a ``config``
    carrying those arguments as attributes, as :mod:`loraq.generation.lean_model` does.

    Raises:
        FileNotFoundError: no such file. FormatError: not GGUF, truncated or corrupt, an
            unsupported architecture or tensor type, a missing or misshaped tensor (named).
    """
    source = str(path)
    # The layout walk reads the metadata values too: no gguf.GGUFReader, whose parse of a
    # large vocabulary takes seconds and holds its numpy views of every string in memory.
    layout = check_gguf_layout(path, VOCABULARY_ARRAYS if tokenizer else ())
    meta = layout.values
    for t in layout.tensors:  # cheap, and a clearer reason than the shapes that follow
        if t.name not in _IGNORED_TENSORS:
            _check_tensor_type(t.name, t.type_name, source)
    config_class, arguments = config_arguments(meta, layout, source)
    with_tokenizer = tokenizer and "tokenizer.ggml.model" in meta
    if with_tokenizer:  # refused before the model is built, not after
        check_vocabulary(layout, source)
    modules = _collect(path, layout, meta["general.architecture"], source)
    if "model.embed_tokens" in modules:  # the table's rows are the vocabulary
        arguments["vocab_size"] = modules["model.embed_tokens"]["weight"][2][0]
    with torch.device("meta"):
        model = None if build is None else build(config_class, dict(arguments))
        if model is None:
            import transformers

            config = getattr(transformers, config_class)(**arguments)
            model = transformers.AutoModelForCausalLM.from_config(config)
    config = model.config
    _place(model, modules, config, meta["general.architecture"], source)
    _materialize_computed(model, config, source)
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    model.requires_grad_(False)
    model.eval()
    model.loraq_gguf_path = str(Path(path).resolve())
    model.config._name_or_path = model.loraq_gguf_path  # saved adapters name this base
    return model, (_converted_tokenizer(path, layout) if with_tokenizer else None)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer (with chat template) converted from a GGUF file's vocabulary.

    The file is checked first (its layout against its size, then its vocabulary), so a
    truncated or hostile file is one FormatError naming it, not transformers' traceback.
    """
    source = str(path)
    layout = check_gguf_layout(path, VOCABULARY_ARRAYS)
    if "tokenizer.ggml.model" not in layout.value_types:
        raise FormatError(f"{source}: the GGUF file holds no tokenizer (no tokenizer.ggml.model)")
    check_vocabulary(layout, source)
    return _converted_tokenizer(path, layout)


def _converted_tokenizer(path: str | os.PathLike[str], layout: GGUFLayout) -> Any:
    """The byte-level vocabularies built straight from ``layout`` (see
    :mod:`loraq.io.gguf_byte_level`), any other through transformers' GGUF conversion."""
    built = byte_level_tokenizer(layout, str(path))
    if built is not None:
        return built
    from transformers import AutoTokenizer

    file = Path(path).resolve()
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as err:  # transformers' converter raises KeyError/ValueError/... on odd files
        raise FormatError(
            f"{path}: transformers cannot build a tokenizer from the file's vocabulary "
            f"({type(err).__name__}: {err})"
        ) from None
