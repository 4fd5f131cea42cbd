"""Write GGUF files llama.cpp runs: a LoRA adapter GGUF, or a merged model GGUF.

Adapter GGUF (``llama-cli -m base.gguf --lora adapter.gguf``, ``llama_adapter_lora_init``)::

    general.architecture   the base's (e.g. "llama")
    general.type           "adapter"
    adapter.type           "lora"
    adapter.lora.alpha     float32; llama.cpp scales each pair by alpha / rank
    <gguf tensor>.lora_a   (r, in)   f32/f16  = loraq's lora_A (ggml ne = [in, r])
    <gguf tensor>.lora_b   (out, r)  f32/f16  = loraq's lora_B * (scaling * r / alpha),
                                               rows in llama.cpp's q/k order (see gguf_names)

so ``alpha / r * lora_b @ lora_a`` is exactly the adapter's ``scaling * B @ A``; rsLoRA (or a
per-layer rank) needs no extra key: the factor in ``lora_b`` absorbs the difference.

Merged model GGUF: every tensor of the model with the adapters folded in, llama.cpp's names and
q/k order, in one of :data:`MERGED_DTYPES`: a dense type (``f32``, ``f16``, ``bf16``), a recipe
of :mod:`.gguf_recipes` (a block format the table of :mod:`loraq.quant.formats` marks
``gguf_export``, every matrix in it, or llama.cpp's mixed ``q4_k_m``, ``q5_k_m``, ... with its
per-tensor choices), or ``keep`` (unadapted GGUF-quantized tensors keep their exact blocks;
adapted ones are re-quantized in their own block format).
Norms are always f32. The metadata (hyperparameters, tokenizer with ``tokenizer.ggml.pre`` and
the chat template) is copied from the base GGUF when the model came from one; otherwise the
hyperparameters come from the config and the tokenizer from the base's folder (or the
``tokenizer`` argument), written by :mod:`loraq.io.gguf_tokenizer`, so llama.cpp tokenizes as
transformers does.

Files are written to a temporary sibling and renamed into place: nothing is left half-written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.gguf import EmbeddingGGUF, LinearGGUF
from ..layers.lora import LoRALayer, ModulesToSave
from ..layers.param_lora import ParamLoRA
from ..model.surgery import CONFIGS_ATTR
from ..quant.formats import DENSE_GGUF_TYPES, FORMATS, format_names
from ..quant.gguf import quantize_gguf
from .gguf_header import check_gguf_layout
from .gguf_names import (
    architecture,
    architecture_of_model_type,
    gguf_row_order,
    hf_to_gguf_name,
    permuted_heads,
)
from .gguf_read import open_gguf
from .gguf_recipes import RECIPES, plan_tensor_types, recipe_names
from .gguf_tokenizer import GGUFVocabulary, gguf_vocabulary, tokenizer_source, write_vocabulary
from .model_folder import source_folder
from .peft_format import PREFIX
from .safe import FormatError, check_replaceable, staged_file

__all__ = ["MERGED_DTYPES", "export_gguf", "gguf_architecture"]

#: Block formats a merged GGUF's matrices can be written in.
_EXPORT_FORMATS = format_names(gguf_export=True)
#: ``dtype`` values of a merged GGUF: dense types, recipes (block formats first), ``keep``.
MERGED_DTYPES = (*DENSE_GGUF_TYPES, *recipe_names(), "keep")
#: ``dtype`` values of an adapter GGUF's tensors (the ones llama.cpp's LoRA loader takes).
ADAPTER_DTYPES = ("f32", "f16")
#: ``keep``: the format an adapted matrix is re-quantized into when loraq cannot write its own
#: (every GGUF format it reads it also writes today).
KEEP_FALLBACK = "q8_0"
# Metadata keys the reader synthesises or the writer sets itself.
_OWN_KEYS = ("GGUF.", "general.architecture", "general.type", "general.file_type")


def gguf_architecture(model: nn.Module) -> str:
    """llama.cpp's ``general.architecture`` for ``model`` (the base GGUF's when loaded from one)."""
    path = getattr(model, "loraq_gguf_path", None)
    if path is not None:  # the bounded header walk: no full parse of the vocabulary arrays
        return str(check_gguf_layout(path).values["general.architecture"])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return architecture_of_model_type(model_type).name


def _heads(model: nn.Module, arch: str, module: str) -> int | None:
    cfg = model.config
    return permuted_heads(arch, module, cfg.num_attention_heads, cfg.num_key_value_heads)


def _to_gguf_rows(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    return t if heads is None else t[gguf_row_order(t.shape[0], heads)]


def _gguf_name(module: str, arch: str) -> str:
    name = hf_to_gguf_name(module.removeprefix(PREFIX), arch)
    if name is None:
        raise FormatError(f"module {module} has no GGUF tensor name in a {arch} model")
    return name


# ------------------------------------------------------------------------------------ adapter
_MERGED_CARRIES = "; --merged carries it (loraq export --merged)"


def _refuse_what_cannot_travel(model: nn.Module, layers: list[tuple[str, LoRALayer]]) -> None:
    """An adapter GGUF holds LoRA pairs of modules only: fully trained modules, trained biases
    and adapters on parameters (``ParamLoRA``, MoE expert stacks) would be dropped, so they are
    refused, each with the module named."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and not module.adapters_disabled:
            if module.active_adapter in module.modules_to_save:
                raise FormatError(
                    f"export_gguf: {name} is a modules_to_save module (trained in full, not a "
                    f"LoRA pair), which an adapter GGUF cannot hold{_MERGED_CARRIES}"
                )
    for name, module in model.named_modules():
        if (
            isinstance(module, ParamLoRA)
            and module.active_adapters
            and not module.adapters_disabled
        ):
            raise FormatError(
                f"export_gguf: {name}.{module.parameter_name} has a LoRA adapter on a parameter "
                f"(target_parameters), which an adapter GGUF cannot hold{_MERGED_CARRIES}"
            )
    active = {a for _, layer in layers for a in layer.active_adapters}
    for adapter, config in getattr(model, CONFIGS_ATTR, {}).items():
        if adapter in active and getattr(config, "bias", "none") != "none":
            raise FormatError(
                f"export_gguf: adapter {adapter!r} trains biases (bias={config.bias!r}), which "
                f"an adapter GGUF cannot hold{_MERGED_CARRIES}"
            )


def _tied_head(model: nn.Module, arch: str) -> bool:
    """The base file holds no ``output.weight`` (the head is the embedding)."""
    return architecture(arch).always_tied or bool(
        getattr(model.config, "tie_word_embeddings", False)
    )


def _adapter_tensors(model: nn.Module, arch: str) -> tuple[dict[str, torch.Tensor], float]:
    """``<gguf tensor>.weight.lora_{a,b}`` of every adapted module, and the file's alpha.

    llama.cpp applies LoRA to ``output`` as to any matrix, and to ``token_embd`` with the pair
    flipped: it gathers rows of ``lora_a`` (vocab, r) by token id and multiplies by ``lora_b``
    (embedding, r), so an embedding adapter's A is written transposed.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    _refuse_what_cannot_travel(model, layers)
    if not layers:
        raise FormatError("export_gguf: the model has no LoRA adapters")
    alpha = None
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        adapter = layer.active_adapters[0] if layer.active_adapters else None
        embedding = adapter is not None and adapter in layer.lora_embedding_A
        if adapter is None or not (embedding or adapter in layer.lora_A):
            raise FormatError(f"export_gguf: {name} has no active LoRA adapter")
        if layer.use_dora[adapter]:
            raise FormatError(
                f"export_gguf: {name} uses DoRA, which llama.cpp adapters cannot hold"
                + _MERGED_CARRIES
            )
        stem = _gguf_name(name, arch)
        if stem == "output" and _tied_head(model, arch):
            raise FormatError(
                f"export_gguf: {name} has a LoRA adapter but the head is tied to the embedding, "
                f"so llama.cpp's base file has no output.weight to apply it to{_MERGED_CARRIES}"
            )
        r, scaling = layer.r[adapter], layer.scaling[adapter]
        alpha = scaling * r if alpha is None else alpha  # the first layer fixes the file's alpha
        a, b = (t.detach().float() for t in layer.adapter_weights(adapter))  # k-bit grid if set
        b = b * (scaling * r / alpha)
        out[stem + ".weight.lora_a"] = a.t().contiguous() if embedding else a
        out[stem + ".weight.lora_b"] = _to_gguf_rows(b, _heads(model, arch, name))
    return out, float(alpha)


def _write_adapter(model: nn.Module, path: Path, dtype: str) -> None:
    import gguf

    arch = gguf_architecture(model)
    tensors, alpha = _adapter_tensors(model, arch)
    np_dtype = np.float16 if dtype == "f16" else np.float32

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, t in tensors.items():
            writer.add_tensor(name, t.numpy().astype(np_dtype))

    _atomic_gguf(path, arch, fill)


# ------------------------------------------------------------------------------------ merged
def _dense_out(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) for a float32 tensor written as ``dtype``."""
    import gguf

    types = gguf.GGMLQuantizationType
    blocks = dtype in _EXPORT_FORMATS
    if blocks and t.dim() == 2 and t.shape[1] % FORMATS[dtype].blocksize == 0:
        return quantize_gguf(t, dtype).numpy(), getattr(types, dtype.upper())
    if dtype == "bf16":
        return gguf.quants.quantize(t.numpy(), types.BF16), types.BF16
    # A matrix whose rows do not fit the blocks is written in f16.
    if (dtype == "f16" or blocks) and t.dim() == 2:
        return t.numpy().astype(np.float16), None
    return t.numpy().astype(np.float32), None


def _param_lora_weight(name: str, module: ParamLoRA) -> torch.Tensor:
    """The weight of a module whose ``weight`` parameter has adapters (``target_parameters``),
    with its active, unmerged adapters added (merged ones are in the parameter already)."""
    if module.parameter_name != "weight" or module.is_3d:
        raise FormatError(
            f"export_gguf: {name}.{module.parameter_name} has adapters on a parameter that no "
            "GGUF tensor holds (only a module's 2-D weight)"
        )
    weight = module.base_param().detach().float()
    if not module.adapters_disabled:
        for adapter in module.active_adapters:
            if adapter in module.r and adapter not in module.merged_adapters:
                weight = weight + module.delta(adapter).detach().float()
    return weight


def _merged_tensor(model: nn.Module, name: str, module: nn.Module, dtype: str, arch: str):
    """(array, raw type) of one matrix: kept blocks, or the merged weight written as ``dtype``."""
    import gguf

    heads = _heads(model, arch, name)
    base = module.base_layer if isinstance(module, LoRALayer) else module
    if isinstance(module, ParamLoRA):
        base = module.holder
    if dtype == "keep" and isinstance(base, (LinearGGUF, EmbeddingGGUF)):
        record = base.qweight
        if not isinstance(module, LoRALayer) or not module.active_adapters:
            blocks = _to_gguf_rows(record.blocks, heads)
            return blocks.numpy(), getattr(gguf.GGMLQuantizationType, record.quant_type.upper())
        dtype = record.quant_type if record.quant_type in _EXPORT_FORMATS else KEEP_FALLBACK
    elif dtype == "keep":
        dtype = "f32"
    if isinstance(module, ParamLoRA):
        weight = _param_lora_weight(name, module)
    elif isinstance(module, LoRALayer):
        weight = module.base_matrix().float()
        for adapter in module.active_adapters:
            if adapter not in module.merged_adapters:
                weight = weight + module.delta_matrix(adapter).detach().float()
        if isinstance(base, nn.Embedding):  # the adapter's orientation is (embedding, vocab)
            weight = weight.t()
    elif isinstance(base, (LinearGGUF, EmbeddingGGUF)):
        weight = base.dequantize_weight(torch.float32)
    else:
        weight = base.weight.detach().float()
    return _dense_out(_to_gguf_rows(weight, heads), dtype)


def _matrix_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, ParamLoRA):
        return tuple(module.base_param().shape)
    base = module.base_layer if isinstance(module, LoRALayer) else module
    record = getattr(base, "qweight", None)
    return tuple(record.shape if record is not None else base.weight.shape)


def _matrix_types(model: nn.Module, dtype: str, matrices: list[tuple[str, nn.Module]]):
    """``dtype`` per matrix: a recipe's per-tensor plan, else ``dtype`` for every one."""
    if dtype not in RECIPES:
        return {key: dtype for key, _ in matrices}
    shapes = [(key, _matrix_shape(module)) for key, module in matrices]
    plan = plan_tensor_types(dtype, shapes, model.config.num_hidden_layers)
    return {key: plan[key] or "f32" for key, _ in matrices}


def _base_metadata(model: nn.Module) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, sub_type) of every base-GGUF metadata entry to copy."""
    import gguf

    path = getattr(model, "loraq_gguf_path", None)
    if path is None:
        return []
    out = []
    for key, field in open_gguf(path).fields.items():
        if key.startswith(_OWN_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


def _rope(cfg: Any, row: Any, head_dim: int) -> tuple[float, int]:
    """(RoPE base of the full-attention layers, rotated dims per head); refuses RoPE scaling and
    what else the file cannot say."""
    params = getattr(cfg, "rope_parameters", None) or {}
    per_layer_type = {k: p for k, p in params.items() if isinstance(p, dict)}  # Gemma 3
    for p in per_layer_type.values() or [params]:
        kind = p.get("rope_type", "default")
        if kind not in ("default", None):
            raise FormatError(
                f"GGUF export: RoPE scaling {kind!r} is not written to GGUF files (unscaled only)"
            )
    sliding = per_layer_type.get("sliding_attention", {}).get("rope_theta")
    if sliding is not None and sliding != row.sliding_rope_theta:
        raise FormatError(
            f"GGUF export: sliding-window layers use RoPE base {sliding}, but llama.cpp's "
            f"{row.name} uses {row.sliding_rope_theta}"
        )
    if per_layer_type:
        params = per_layer_type.get("full_attention", next(iter(per_layer_type.values())))
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if factor != 1.0 and not row.partial_rotary:
        raise FormatError(f"GGUF export: {row.name} has no partial RoPE (factor {factor})")
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    return theta, int(head_dim * float(factor or 1.0))


def _config_metadata(writer: Any, model: nn.Module, arch: str) -> None:
    cfg = model.config
    row = architecture(arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta, rope_dims = _rope(cfg, row, head_dim)
    for attribute in row.head_dim_attributes:  # llama.cpp derives these from the head size
        if getattr(cfg, attribute, head_dim) != head_dim:
            raise FormatError(
                f"GGUF export: {arch} config has {attribute}={getattr(cfg, attribute)}, but "
                f"llama.cpp uses the head size {head_dim}"
            )
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(rope_dims)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    for p in row.hyperparameters:
        value = getattr(cfg, p.attribute, None)
        if value is not None:
            add = writer.add_uint32 if p.kind is int else writer.add_float32
            add(f"{arch}.{p.key}", p.kind(value))


def _vocabulary(model: nn.Module, tokenizer: Any) -> GGUFVocabulary | None:
    """The vocabulary to write into a merged GGUF: ``tokenizer`` (a folder or a transformers
    tokenizer) or the base folder's, padded to the embedding's rows; None (with a warning: the
    file will not load in llama.cpp) when there is none."""
    source = tokenizer if tokenizer is not None else tokenizer_source(source_folder(model))
    if source is None:
        import warnings

        warnings.warn(
            "export_gguf: no tokenizer found (pass tokenizer=...); llama.cpp refuses a model "
            "GGUF without one",
            stacklevel=3,
        )
        return None
    return gguf_vocabulary(source, rows=model.get_input_embeddings().num_embeddings)


def _running_copy(module: ModulesToSave) -> nn.Module:
    active = module.active_adapter
    if not module.adapters_disabled and active in module.modules_to_save:
        return module.modules_to_save[active]
    return module.original_module


def _write_merged(model: nn.Module, path: Path, dtype: str, tokenizer: Any = None) -> None:
    import gguf

    arch = gguf_architecture(model)
    copied = _base_metadata(model)
    vocab = None if copied else _vocabulary(model, tokenizer)
    tensors: dict[str, tuple[np.ndarray, Any] | None] = {}
    matrices: list[tuple[str, str, nn.Module]] = []  # (GGUF name, module name, module)
    row = architecture(arch)
    tied = row.always_tied or bool(getattr(model.config, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        plain = name.removeprefix(PREFIX)
        target = hf_to_gguf_name(plain, arch)
        if target is None:
            continue  # wrapper internals (base_layer, lora_A, ...) have no GGUF name
        trained_head = isinstance(module, ModulesToSave) and _running_copy(module) is not (
            module.original_module
        )
        if target == "output" and tied and not trained_head:
            continue
        if target == "output" and trained_head and row.always_tied:
            raise FormatError(
                f"export_gguf: {name} is trained apart from the embedding, but {arch} files "
                "always tie the head to token_embd"
            )
        if isinstance(module, ModulesToSave):  # the trained copy the model runs
            module = _running_copy(module)
        matrix_kinds = (LoRALayer, ParamLoRA, nn.Linear, nn.Embedding, LinearGGUF, EmbeddingGGUF)
        if isinstance(module, matrix_kinds):
            tensors[target + ".weight"] = None  # filled below, in file order
            matrices.append((target + ".weight", plain, module))
            holder = module.holder if isinstance(module, ParamLoRA) else module
            bias = getattr(holder, "bias", None)
            if isinstance(bias, torch.Tensor):
                heads = _heads(model, arch, plain)
                tensors[target + ".bias"] = (
                    _to_gguf_rows(bias.detach().float(), heads).numpy(),
                    None,
                )
        elif hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):  # norms
            norm = module.weight.detach().float() + row.norm_offset  # Gemma's 1 + w
            tensors[target + ".weight"] = (norm.numpy(), None)
    types = _matrix_types(model, dtype, [(key, module) for key, _, module in matrices])
    for key, plain, module in matrices:
        tensors[key] = _merged_tensor(model, plain, module, types[key], arch)
    file_type = RECIPES[dtype].file_type if dtype in RECIPES else None

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        if file_type is not None:
            writer.add_file_type(file_type)
        if copied:
            for key, value, vtype, sub in copied:
                writer.add_key_value(key, value, vtype, sub_type=sub)
        else:
            _config_metadata(writer, model, arch)
            if vocab is not None:
                write_vocabulary(writer, vocab)
        for name, (array, raw) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw)

    _atomic_gguf(path, arch, fill)


# ------------------------------------------------------------------------------------ shared
def _atomic_gguf(path: Path, arch: str, fill: Any) -> None:
    import gguf

    with staged_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    merged: bool = False,
    dtype: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model``'s adapter (default) or the merged model as a GGUF file llama.cpp runs.

    Args:
        model: a transformers model of an architecture in
            :data:`loraq.io.gguf_names.ARCHITECTURES` with loraq adapters (from ``loraq.apply`` /
            ``load_adapter``, over a dense, NF4 or GGUF base; :func:`loraq.load_gguf` bases also
            pass their metadata and tokenizer through).
        path: the ``.gguf`` file to write (atomically).
        merged: False: an adapter GGUF of the active adapter (``dtype`` ``f32``, the default, or
            ``f16``). True: the whole model with the adapters folded in (``dtype`` one of
            :data:`MERGED_DTYPES`, default ``keep`` for a GGUF base and ``f16`` otherwise).
        tokenizer: merged files only: a tokenizer folder or transformers fast tokenizer whose
            vocabulary, special tokens and chat template go into the file (see
            :mod:`loraq.io.gguf_tokenizer`). Default: a GGUF base's own metadata, else the
            tokenizer of the folder the base was loaded from.

    Raises:
        FormatError: an unsupported architecture, DoRA or non-linear adapters, a module with
            no GGUF name, a bad ``dtype``.
        FileExistsError: ``path`` exists and is not a regular file (a device node, a FIFO).
        OSError: ENOSPC naming ``path`` for a full disk; no partial file is left.
    """
    target = Path(path)
    check_replaceable(target)  # before the work: never replace a device node or FIFO
    if merged:
        dtype = dtype or ("keep" if getattr(model, "loraq_gguf_path", None) else "f16")
        if dtype not in MERGED_DTYPES:
            raise FormatError(f"export_gguf: merged dtype {dtype!r} is not one of {MERGED_DTYPES}")
        with torch.no_grad():
            _write_merged(model, target, dtype, tokenizer)
    else:
        dtype = dtype or "f32"
        if dtype not in ADAPTER_DTYPES:
            raise FormatError(
                f"export_gguf: adapter dtype {dtype!r} is not one of {ADAPTER_DTYPES}"
            )
        _write_adapter(model, target, dtype)
    return target
