"""Read a GGUF model (llama.cpp's file) into a transformers model whose weights stay quantized.

``load_gguf(path)`` builds the transformers model on the meta device (no dense weights are
allocated), then puts each GGUF tensor in place: block-quantized matrices become
:class:`~loraq.layers.gguf.LinearGGUF` / :class:`~loraq.layers.gguf.EmbeddingGGUF` holding the
file's bytes (q/k rows put back in transformers' order), dense ones (norms, f32/f16/bf16
matrices) become ordinary frozen float32 parameters. Peak memory is about the file size.

The container is read only through the ``gguf`` package (llama.cpp's own reader); the
tokenizer and chat template come from transformers' GGUF tokenizer conversion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.gguf import EmbeddingGGUF, LinearGGUF
from ..model.targeting import set_submodule
from ..quant.formats import DENSE_GGUF_TYPES, GGUF, format_names
from ..quant.gguf_tensor import GGUFTensor
from .gguf_names import SUPPORTED_ARCHITECTURES, gguf_to_hf_name, hf_row_order, permuted_heads
from .safe import FormatError

__all__ = [
    "GGUF_MAGIC",
    "gguf_metadata",
    "gguf_model_file",
    "load_gguf",
    "load_gguf_tokenizer",
    "open_gguf",
]

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
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


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; FormatError naming the file if it is not valid GGUF."""
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - the extra is missing
        raise ImportError("reading GGUF needs the gguf package: pip install 'loraq[gguf]'") from err
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file {file} does not exist")
    with open(file, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise FormatError(f"{file}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(file)
    except Exception as err:  # the reader raises ValueError/IndexError/... on corrupt files
        raise FormatError(
            f"{file}: truncated or corrupt GGUF file ({type(err).__name__}: {err})"
        ) from None


def gguf_metadata(reader: Any, skip_arrays_over: int = 64) -> dict[str, Any]:
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


def _require(meta: dict[str, Any], key: str, source: str) -> Any:
    if key not in meta:
        raise FormatError(f"{source}: metadata key {key!r} is missing")
    return meta[key]


def model_config(meta: dict[str, Any], tensor_names: set[str], source: str) -> Any:
    """The transformers config of a Llama-family GGUF's metadata."""
    import transformers

    arch = _require(meta, "general.architecture", source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"{source}: general.architecture {arch!r} is not supported; loraq reads "
            f"{SUPPORTED_ARCHITECTURES}"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise FormatError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported")
    n_head = int(_require(meta, f"{arch}.attention.head_count", source))
    hidden = int(_require(meta, f"{arch}.embedding_length", source))
    vocab = meta.get(f"{arch}.vocab_size")
    kwargs: dict[str, Any] = dict(
        vocab_size=int(vocab) if vocab is not None else None,
        hidden_size=hidden,
        intermediate_size=int(_require(meta, f"{arch}.feed_forward_length", source)),
        num_hidden_layers=int(_require(meta, f"{arch}.block_count", source)),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // n_head)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    if arch == "mistral":
        kwargs.pop("head_dim")
    return getattr(transformers, classes[arch])(
        **{k: v for k, v in kwargs.items() if v is not None}
    )


def tensor_value(t: Any, source: str) -> tuple[str, torch.Tensor, tuple[int, ...]]:
    """(format, data, logical shape): uint8 blocks for block formats, float32 otherwise."""
    type_name = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if type_name in _DENSE_TYPES:
        import gguf

        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        return "dense", torch.from_numpy(np.array(data, dtype=np.float32)), shape
    quant = type_name.lower()
    if quant not in _BLOCK_FORMATS:
        raise FormatError(
            f"{source}: tensor {t.name!r} has type {type_name}; loraq reads "
            f"{', '.join(_DENSE_TYPES + tuple(q.upper() for q in _BLOCK_FORMATS))}"
        )
    return quant, torch.from_numpy(np.array(t.data, dtype=np.uint8)), shape


def _collect(reader: Any, source: str) -> dict[str, dict[str, tuple[str, torch.Tensor, tuple]]]:
    """HF module path -> {"weight"/"bias": (format, data, shape)}."""
    modules: dict[str, dict[str, tuple[str, torch.Tensor, tuple]]] = {}
    for t in reader.tensors:
        if t.name in _IGNORED_TENSORS:
            continue
        stem, _, suffix = t.name.rpartition(".")
        module = gguf_to_hf_name(stem)
        if module is None or suffix not in ("weight", "bias"):
            raise FormatError(f"{source}: tensor {t.name!r} has no place in a Llama-family model")
        modules.setdefault(module, {})[suffix] = tensor_value(t, source)
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


def _build_embedding(module: nn.Module, name: str, parts: dict, source: str) -> nn.Module:
    fmt, data, shape = parts["weight"]
    _check_shape(name + ".weight", shape, module.weight.shape, source)
    if fmt == "dense":
        new = nn.Embedding(shape[0], shape[1], padding_idx=module.padding_idx)
        new.weight = nn.Parameter(data, requires_grad=False)
        return new
    return EmbeddingGGUF(GGUFTensor(data, shape, torch.float32, fmt), module.padding_idx)


def _tied_head(embedding: nn.Module) -> nn.Module:
    """The output head sharing the embedding's storage (GGUF files omit output.weight)."""
    if isinstance(embedding, EmbeddingGGUF):
        return LinearGGUF(embedding.qweight)
    head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    head.weight = embedding.weight
    return head


def _place(model: nn.Module, modules: dict, config: Any, arch: str, source: str) -> None:
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    for name, parts in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{source}: the model has no module {name}") from None
        if "weight" not in parts:
            raise FormatError(f"{source}: {name} has a bias but no weight tensor")
        if isinstance(module, nn.Embedding):
            new = _build_embedding(module, name, parts, source)
        elif isinstance(module, nn.Linear):
            heads = permuted_heads(arch, name, n_head, n_kv)
            new = _build_linear(module, name, parts, heads, source)
        else:  # a norm: its single weight vector
            fmt, data, shape = parts["weight"]
            _check_shape(name + ".weight", shape, module.weight.shape, source)
            module.weight = nn.Parameter(data, requires_grad=False)
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


def load_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, tokenizer: bool = True
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a GGUF file, its quantized tensors kept quantized.

    Supported architectures: ``llama`` (incl. SmolLM2), ``mistral``, ``qwen2``. Tensors in the
    GGUF block formats of :mod:`loraq.quant.formats` (q8_0, q4_0, q4_1 and the k-quants) stay as
    the file's bytes (dequantized to ``dtype`` per matmul); F32/F16/BF16 tensors load as float32. The model is in eval mode,
    every parameter frozen, ready for :func:`loraq.apply`; ``model.loraq_gguf_path`` records
    the file. ``tokenizer`` is transformers' conversion of the GGUF vocabulary with the chat
    template (None when ``tokenizer=False`` or the file has none).

    Raises:
        FileNotFoundError: no such file. FormatError: not GGUF, truncated or corrupt, an
            unsupported architecture or tensor type, a missing or misshaped tensor (named).
    """
    from transformers import AutoModelForCausalLM

    source = str(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    config = model_config(meta, {t.name for t in reader.tensors}, source)
    modules = _collect(reader, source)
    if "model.embed_tokens" in modules:  # the table's rows are the vocabulary
        config.vocab_size = modules["model.embed_tokens"]["weight"][2][0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _place(model, modules, config, meta["general.architecture"], source)
    _materialize_computed(model, config, source)
    for module in model.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = dtype
    model.requires_grad_(False)
    model.eval()
    model.loraq_gguf_path = str(Path(path).resolve())
    model.config._name_or_path = model.loraq_gguf_path  # saved adapters name this base
    tok = load_gguf_tokenizer(path) if tokenizer and "tokenizer.ggml.model" in meta else None
    return model, tok


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """transformers' tokenizer (with chat template) converted from a GGUF file's vocabulary."""
    from transformers import AutoTokenizer

    file = Path(path).resolve()
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
