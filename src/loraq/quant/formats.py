"""The one table of base formats: every format loraq stores a frozen weight in, declared once.

=======  =========  ====  =====  ================  ========  =====  ===========  ===============
name     kind       code  block  record            quantize  train  gguf_export  bits per param
=======  =========  ====  =====  ================  ========  =====  ===========  ===============
nf4      blockwise  4     64     QuantizedTensor   yes       yes    -            4.5 (4.127 DQ)
fp4      blockwise  4     64     QuantizedTensor   yes       yes    -            4.5 (4.127 DQ)
int8     blockwise  8     256    QuantizedTensor8  yes       yes    -            8.125
q8_0     gguf       8     32     GGUFTensor        yes       yes    yes          8.5
q4_0     gguf       4     32     GGUFTensor        yes       yes    yes          4.5
q4_1     gguf       4     32     GGUFTensor        yes       yes    yes          5.0
q5_0     gguf       5     32     GGUFTensor        yes       yes    yes          5.5
q5_1     gguf       5     32     GGUFTensor        yes       yes    yes          6.0
q4_k     gguf       4     256    GGUFTensor        yes       yes    yes          4.5
q5_k     gguf       5     256    GGUFTensor        yes       yes    yes          5.5
q6_k     gguf       6     256    GGUFTensor        yes       yes    yes          6.5625
=======  =========  ====  =====  ================  ========  =====  ===========  ===============

Columns: ``kind`` is ``blockwise`` (bitsandbytes-style flat blocks with float32 scales, code
books in :mod:`.codebooks`) or ``gguf`` (llama.cpp's row blocks, :mod:`.gguf`); ``code`` the
bits of one code; ``block`` the default block size (fixed for GGUF); ``record`` the class that
holds a tensor in the format; ``quantize``: loraq writes it (``LoraConfig.quant``,
``QLoRALayer(quant=...)``, ``loraq serve --quant``; the k-quants write llama.cpp's reference
bytes, see :mod:`.kquants`); ``train``: adapters train over a base held in it;
``gguf_export``: ``export_gguf`` can write a merged model's tensors in it (the mixed per-tensor
recipes such as ``q4_k_m`` are in :mod:`.kquant_recipes`). Bits per parameter count codes and block scales
(:meth:`BaseFormat.bits_per_param`; "DQ": with double quantization, LoraConfig's default).

The layer class of each format is not here (quantized layers live above ``quant/``): it comes
from :mod:`loraq.layers.bases`, which maps a record class to its layer class.

**Block sizes.** 4-bit: 64, as bitsandbytes' ``Linear4bit`` and QLoRA. ``int8``: 256, for
``LoraConfig(quant="int8")`` and ``QLoRALayer(bits=8)`` alike. The reference is bitsandbytes'
8-bit blockwise quantization, ``quantize_blockwise(A, code=None, absmax=None, out=None,
blocksize=4096, nested=False)``: its signature defaults to 4096, but every 8-bit blockwise tensor
bitsandbytes keeps itself uses 256 (its 8-bit optimizer states; the nested scales of double
quantization). We follow what it keeps: on the weights of all-MiniLM-L6-v2 the relative RMS
error is 0.96% at 64, 1.10% at 256 and 1.37% at 4096, for 8.5, 8.125 and 8.008 bits per
parameter, so 256 buys 20% less error than 4096 for 0.12 bits, where 64 would cost 0.375 bits
more for 13% less. ``LoraConfig.blocksize`` and ``QLoRALayer(blocksize=)`` default to ``None``:
the format's block size from this table.

GGUF files also hold dense tensors (:data:`DENSE_GGUF_TYPES`); they load as float weights, so
they are tensor types of the file, not base formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codebooks import DEFAULT_BLOCKSIZE_4BIT, DEFAULT_BLOCKSIZE_8BIT, NESTED_BLOCKSIZE
from .gguf import block_size, type_size
from .gguf_tensor import GGUFTensor
from .qtensor import QuantizedTensor
from .qtensor8 import QuantizedTensor8

__all__ = [
    "BLOCKWISE",
    "DENSE_GGUF_TYPES",
    "FORMATS",
    "GGUF",
    "BaseFormat",
    "Record",
    "base_format",
    "format_names",
]

#: ``kind`` of the bitsandbytes-style formats (flat blocks, float32 scales, a code book).
BLOCKWISE = "blockwise"
#: ``kind`` of llama.cpp's block formats.
GGUF = "gguf"
#: Dense tensor types of a GGUF file (loraq reads them as float and writes them in exports).
DENSE_GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "bf16")

#: A quantized tensor of any base format.
Record = QuantizedTensor | QuantizedTensor8 | GGUFTensor


@dataclass(frozen=True)
class BaseFormat:
    """One row of the table: a base format and what loraq may do with it (module docstring)."""

    name: str
    kind: str
    code_bits: int
    blocksize: int
    record: type
    quantize: bool
    train: bool = True
    gguf_export: bool = False

    def resolve_blocksize(self, blocksize: int | None) -> int:
        """``blocksize``, or this format's default for ``None``. A GGUF format's blocks are
        fixed, so a block size given for one does not apply (as ``double_quant``)."""
        if blocksize is None or self.kind == GGUF:
            return self.blocksize
        return blocksize

    def bits_per_param(self, blocksize: int | None = None, double_quant: bool = False) -> float:
        """Storage of one parameter in bits: code plus block scales (code books not counted).

        ``double_quant`` stores a 4-bit format's float32 scales as 8-bit codes with one float32
        per :data:`~.codebooks.NESTED_BLOCKSIZE` of them (QLoRA's double quantization).
        """
        if self.kind == GGUF:
            return 8 * type_size(self.name) / block_size(self.name)
        size = self.resolve_blocksize(blocksize)
        if double_quant and self.record is QuantizedTensor:
            return self.code_bits + 8 / size + 32 / (size * NESTED_BLOCKSIZE)
        return self.code_bits + 32 / size

    def quantize_tensor(
        self, tensor: torch.Tensor, blocksize: int | None = None, double_quant: bool = True
    ) -> Record:
        """``tensor`` as a record of this format (``blocksize`` ``None``: the format's default;
        ``double_quant`` applies to the 4-bit formats only).

        Raises:
            ValueError: a format loraq only reads, or what the record's quantizer refuses.
        """
        if not self.quantize:
            raise ValueError(
                f"loraq reads {self.name} but cannot quantize into it; formats it writes: "
                f"{', '.join(format_names(quantize=True))}"
            )
        size = self.resolve_blocksize(blocksize)
        if self.record is GGUFTensor:
            return GGUFTensor.from_tensor(tensor, self.name)
        if self.record is QuantizedTensor8:
            return QuantizedTensor8.from_tensor(tensor, size)
        return QuantizedTensor.from_tensor(tensor, size, self.name, double_quant)


def _gguf(name: str, code_bits: int, quantize: bool) -> BaseFormat:
    # A GGUF format's block size is ggml's (quant/gguf.py holds the block geometry).
    return BaseFormat(
        name, GGUF, code_bits, block_size(name), GGUFTensor, quantize, gguf_export=quantize
    )


#: Every base format by name, in the order users see them listed.
FORMATS: dict[str, BaseFormat] = {
    f.name: f
    for f in (
        BaseFormat("nf4", BLOCKWISE, 4, DEFAULT_BLOCKSIZE_4BIT, QuantizedTensor, quantize=True),
        BaseFormat("fp4", BLOCKWISE, 4, DEFAULT_BLOCKSIZE_4BIT, QuantizedTensor, quantize=True),
        BaseFormat("int8", BLOCKWISE, 8, DEFAULT_BLOCKSIZE_8BIT, QuantizedTensor8, quantize=True),
        _gguf("q8_0", 8, quantize=True),
        _gguf("q4_0", 4, quantize=True),
        _gguf("q4_1", 4, quantize=True),
        _gguf("q5_0", 5, quantize=True),
        _gguf("q5_1", 5, quantize=True),
        _gguf("q4_k", 4, quantize=True),
        _gguf("q5_k", 5, quantize=True),
        _gguf("q6_k", 6, quantize=True),
    )
}


def format_names(
    *,
    kind: str | None = None,
    quantize: bool | None = None,
    train: bool | None = None,
    gguf_export: bool | None = None,
    code_bits: int | None = None,
) -> tuple[str, ...]:
    """Names of the formats that match every filter given (``None``: any), in table order."""
    wanted = {
        "kind": kind,
        "quantize": quantize,
        "train": train,
        "gguf_export": gguf_export,
        "code_bits": code_bits,
    }
    return tuple(
        f.name
        for f in FORMATS.values()
        if all(v is None or getattr(f, k) == v for k, v in wanted.items())
    )


def base_format(name: str, where: str = "base format") -> BaseFormat:
    """The row of ``name``.

    Raises:
        ValueError: naming ``where`` (e.g. ``"LoraConfig.quant"``) and listing the table's names.
    """
    if name not in FORMATS:
        raise ValueError(f"{where} {name!r} is unknown: expected one of {', '.join(FORMATS)}")
    return FORMATS[name]
