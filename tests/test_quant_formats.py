"""The one table of base formats (loraq.quant.formats): every site reads it, and it agrees with the
math below it, the layers above it and its own docstring."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn

import loraq
from loraq.layers.bases import EMBEDDING_LAYERS, LINEAR_LAYERS, embedding_format, linear_class
from loraq.layers.gguf import LinearGGUF
from loraq.layers.quantized import Linear4bit, Linear8bit
from loraq.model.config import QUANT_TYPES
from loraq.quant import formats
from loraq.quant.codebooks import CODE_BOOKS_4BIT
from loraq.quant.formats import BLOCKWISE, FORMATS, GGUF, base_format, format_names
from loraq.quant.gguf import GGUF_QUANT_TYPES, GGUF_TRAINABLE_TYPES
from loraq.serve.command import add_arguments as serve_arguments

WRITABLE = format_names(quantize=True)
READ_ONLY = tuple(n for n in FORMATS if n not in WRITABLE)


def _record(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized base's stored tensors (codes and scales) by field name."""
    base = layer.base_layer if isinstance(layer, loraq.LoRALayer) else layer
    return {k: v for k, v in base.qweight.tensors().items() if v is not None}


# ------------------------------------------------------------------------------ one block size
@pytest.mark.parametrize("quant,bits", [("int8", 8), ("nf4", 4)])
def test_lora_config_and_qlora_layer_write_the_same_bytes(quant: str, bits: int) -> None:
    torch.manual_seed(0)
    # 3000 weights: 11 full 256-element blocks and a partial one, 46 full 64-element blocks.
    dense = nn.Linear(30, 100)
    model = nn.Sequential(nn.Linear(30, 100))
    model[0].load_state_dict(dense.state_dict())
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["0"], quant=quant))
    via_config = _record(model[0])
    via_layer = _record(loraq.QLoRALayer(dense, rank=2, bits=bits))
    assert via_config.keys() == via_layer.keys()
    for name in via_config:
        assert torch.equal(via_config[name], via_layer[name]), name
    expected = base_format(quant).blocksize
    assert model[0].base_layer.qweight.blocksize == expected
    scales = via_config["absmax_codes" if "absmax_codes" in via_config else "absmax"]
    assert scales.numel() == -(-dense.weight.numel() // expected)  # one scale per block


def test_int8_block_size_is_bitsandbytes_kept_256_and_4bit_is_linear4bit_64() -> None:
    # int8: what bitsandbytes uses for the 8-bit blockwise data it keeps (optimizer states,
    # nested scales); 4-bit: bitsandbytes' Linear4bit / QLoRA default.
    assert base_format("int8").blocksize == 256
    assert base_format("nf4").blocksize == base_format("fp4").blocksize == 64
    assert loraq.LoraConfig().blocksize is None
    layer = loraq.QLoRALayer(nn.Linear(64, 8), rank=2, bits=8, blocksize=64)
    assert layer.base_layer.qweight.blocksize == 64  # an explicit block size still wins


# ------------------------------------------------------------------------------ accepted names
def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraq serve")
    serve_arguments(parser)
    return parser


@pytest.mark.parametrize("name", WRITABLE)
def test_every_writable_format_is_accepted_where_the_table_says(name: str) -> None:
    assert loraq.LoraConfig(quant=name).quant == name
    assert _serve_parser().parse_args(["--base", "b", "--quant", name]).quant == name
    width = max(64, base_format(name).blocksize)  # a k-quant super-block holds 256 values
    layer = loraq.QLoRALayer(nn.Linear(width, 8), rank=2, quant=name)
    assert isinstance(layer.base_layer, linear_class(base_format(name)))
    assert layer.base_layer.qweight.quant_type in (name, "int8")


def test_lists_of_accepted_formats_are_the_tables() -> None:
    assert QUANT_TYPES == (None, *WRITABLE)
    choices = next(a.choices for a in _serve_parser()._actions if a.dest == "quant")
    assert tuple(choices) == WRITABLE
    from loraq.io.gguf_recipes import recipe_names
    from loraq.io.gguf_write import MERGED_DTYPES

    assert recipe_names(mixed=False) == format_names(gguf_export=True)
    assert MERGED_DTYPES == (*formats.DENSE_GGUF_TYPES, *recipe_names(), "keep")


@pytest.mark.parametrize("name", ["q3_k", "int4", *READ_ONLY])
def test_unknown_or_read_only_formats_are_refused_listing_the_tables_names(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=rf"LoraConfig.quant='{name}' is invalid") as err:
        loraq.LoraConfig(quant=name)
    assert all(repr(n) in str(err.value) for n in WRITABLE)
    with pytest.raises(ValueError, match=rf"QLoRALayer quant='{name}'") as err:
        loraq.QLoRALayer(nn.Linear(256, 8), rank=2, quant=name)
    assert all(n in str(err.value) for n in WRITABLE)
    with pytest.raises(SystemExit):
        _serve_parser().parse_args(["--base", "b", "--quant", name])
    message = capsys.readouterr().err
    assert f"invalid choice: '{name}'" in message and all(n in message for n in WRITABLE)
    if name in FORMATS:
        with pytest.raises(ValueError, match=f"loraq reads {name} but cannot quantize"):
            base_format(name).quantize_tensor(torch.randn(4, 256))
    else:
        with pytest.raises(ValueError, match="q4_0, q4_1, q5_0, q5_1, q4_k"):
            base_format(name)


# ------------------------------------------------------------------------ the table and the rest
def test_table_agrees_with_the_math_below_it() -> None:
    assert format_names(kind=GGUF) == GGUF_QUANT_TYPES
    assert format_names(kind=GGUF, quantize=True) == GGUF_TRAINABLE_TYPES
    assert format_names(kind=BLOCKWISE, code_bits=4) == tuple(CODE_BOOKS_4BIT)
    assert set(format_names()) == set(FORMATS)
    for fmt in FORMATS.values():
        assert fmt.kind in (BLOCKWISE, GGUF)
        assert fmt.quantize or fmt.kind == GGUF  # every blockwise format is loraq's own
        assert not fmt.gguf_export or (fmt.kind == GGUF and fmt.quantize)


@pytest.mark.parametrize("name", WRITABLE)
@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_param_is_what_the_record_stores(name: str, double_quant: bool) -> None:
    fmt = base_format(name)
    record = fmt.quantize_tensor(torch.randn(64, 1024), double_quant=double_quant)
    stored = record.nbytes - (4 if getattr(record, "offset", None) is not None else 0)
    assert 8 * stored / (64 * 1024) == fmt.bits_per_param(double_quant=double_quant)


def test_every_record_has_its_layers_and_each_format_one_linear_layer() -> None:
    assert {f.record for f in FORMATS.values()} == set(LINEAR_LAYERS)
    assert set(EMBEDDING_LAYERS) <= set(LINEAR_LAYERS)
    assert linear_class(base_format("nf4")) is Linear4bit
    assert linear_class(base_format("int8")) is Linear8bit
    assert linear_class(base_format("q6_k")) is LinearGGUF
    # int8 has no embedding layer: its tables are stored in nf4 (quant_embeddings=True)
    assert embedding_format("int8").name == "nf4"
    assert embedding_format("q4_0").name == "q4_0"


def test_module_docstring_table_matches_the_table() -> None:
    rows = re.findall(
        r"^(\w+)\s+(blockwise|gguf)\s+(\d+)\s+(\d+)\s+(\w+)\s+(\S+)\s+(\S+)\s+(\S+)"
        r"\s+([\d.]+)",
        formats.__doc__,
        flags=re.M,
    )
    assert [r[0] for r in rows] == list(FORMATS)
    for name, kind, code, block, record, quantize, train, export, bits in rows:
        fmt = FORMATS[name]
        assert (kind, int(code), int(block), record) == (
            fmt.kind,
            fmt.code_bits,
            fmt.blocksize,
            fmt.record.__name__,
        )
        assert (quantize == "yes", train == "yes", export == "yes") == (
            fmt.quantize,
            fmt.train,
            fmt.gguf_export,
        )
        assert float(bits) == fmt.bits_per_param()
