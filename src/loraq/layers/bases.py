"""Which layer holds each base format: the one record -> layer class mapping, and the builders.

=================  ===========  =============  ==================================
record             Linear       Embedding      formats (:mod:`loraq.quant.formats`)
=================  ===========  =============  ==================================
QuantizedTensor    Linear4bit   Embedding4bit  nf4, fp4
QuantizedTensor8   Linear8bit   (none: nf4)    int8
GGUFTensor         LinearGGUF   EmbeddingGGUF  q8_0, q4_0, q4_1, k-quants
=================  ===========  =============  ==================================

Each layer class names the record it holds (``_record_type``); the mappings below are read from
those classes, and a format's layer is the layer of its record. A format with no embedding layer
stores embedding tables in :data:`EMBEDDING_FALLBACK`. :func:`quantize_linear` is the one path
that turns a dense Linear into a quantized base: ``LoraConfig(quant=...)`` (through
:func:`loraq.model.quantize.quantize_model`) and :class:`~loraq.layers.qlora.QLoRALayer` both take
it, so the same format and settings give the same bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.formats import BaseFormat, Record, base_format
from .gguf import EmbeddingGGUF, LinearGGUF
from .quantized import Embedding4bit, Linear4bit, Linear8bit, _linear_weight, _QuantizedLinear

__all__ = [
    "EMBEDDING_FALLBACK",
    "EMBEDDING_LAYERS",
    "LINEAR_LAYERS",
    "embedding_format",
    "linear_class",
    "quantize_embedding",
    "quantize_linear",
]

#: record class -> the layer that holds it in place of an ``nn.Linear`` / GPT-2 ``Conv1D``.
LINEAR_LAYERS: dict[type, type[_QuantizedLinear]] = {
    cls._record_type: cls for cls in (Linear4bit, Linear8bit, LinearGGUF)
}
#: record class -> the layer that holds it in place of an ``nn.Embedding``.
EMBEDDING_LAYERS: dict[type, type[Embedding4bit]] = {
    cls._record_type: cls for cls in (Embedding4bit, EmbeddingGGUF)
}
#: Format of embedding tables when the base format has no embedding layer (int8).
EMBEDDING_FALLBACK = "nf4"


def linear_class(fmt: BaseFormat) -> type[_QuantizedLinear]:
    """The layer class that holds a Linear weight in format ``fmt``."""
    return LINEAR_LAYERS[fmt.record]


def embedding_format(quant: str) -> BaseFormat:
    """The format embedding tables are stored in when the base format is ``quant``."""
    fmt = base_format(quant)
    return fmt if fmt.record in EMBEDDING_LAYERS else base_format(EMBEDDING_FALLBACK)


def quantize_linear(
    linear: nn.Module,
    quant: str,
    *,
    blocksize: int | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> _QuantizedLinear:
    """``linear`` (an ``nn.Linear`` or GPT-2 ``Conv1D``) as a frozen base in format ``quant``.

    ``blocksize`` ``None`` is the format's default; ``double_quant`` applies to the 4-bit formats.
    The bias is shared and the dense layout recorded, as the classes' ``from_linear`` do.
    """
    fmt = base_format(quant)
    weight, layout = _linear_weight(linear)
    record: Record = fmt.quantize_tensor(weight, blocksize, double_quant)
    return linear_class(fmt)(record, linear.bias, compute_dtype, layout)


def quantize_embedding(
    embedding: nn.Embedding, quant: str, *, blocksize: int | None = None, double_quant: bool = True
) -> Embedding4bit:
    """``embedding`` as a frozen table in :func:`embedding_format` of ``quant`` (its output dtype
    stays the weight's); ``blocksize`` ``None`` is that format's default.

    Raises:
        ValueError: for ``max_norm`` (it rewrites the table in place) or sparse gradients.
    """
    fmt = embedding_format(quant)
    cls = EMBEDDING_LAYERS[fmt.record]
    if embedding.max_norm is not None or embedding.sparse:
        raise ValueError(f"{cls.__name__} supports neither max_norm nor sparse embeddings")
    record = fmt.quantize_tensor(embedding.weight, blocksize, double_quant)
    return cls(record, embedding.padding_idx, None)
