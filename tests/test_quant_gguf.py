"""GGUF block formats against the ``gguf`` package (llama.cpp's own Python reader/writer).

``quantize_gguf`` must return the package's bytes and ``dequantize_gguf`` its float32 values bit
for bit; ``LinearGGUF`` must plug into LoRA as the NF4 base does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loraq
from conftest import ReferenceLibrary, tiny_gpt2, tiny_llama
from loraq.layers.gguf import EmbeddingGGUF, LinearGGUF
from loraq.layers.protocol import QuantizedBase
from loraq.layers.quantized import DequantScratch
from loraq.model.quantize import dequantize_model
from loraq.quant.gguf import (
    GGUF_QUANT_TYPES,
    GGUF_TRAINABLE_TYPES,
    block_size,
    dequantize_gguf,
    gguf_bytes_shape,
    quantize_gguf,
    type_size,
)
from loraq.quant.gguf_tensor import GGUFTensor

gguf = ReferenceLibrary("gguf")
#: The 32-value block formats: the ``gguf`` package quantizes them too (the k-quants' own
#: tests, against llama.cpp's quantizer, are in test_kquants.py).
BLOCK32 = tuple(n for n in GGUF_TRAINABLE_TYPES if block_size(n) == 32)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # fp16 overflow at scale 6e4


def gguf_type(name: str):
    return getattr(gguf.GGMLQuantizationType, name.upper())


def sample(seed: int, rows: int, blocks: int, scale: float, special: str) -> np.ndarray:
    """float32 (rows, 32 * blocks) with a per-row scale and some structured blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 32 * blocks)).astype(np.float32) * np.float32(scale)
    if special == "zeros":
        x[0, :32] = 0
    elif special == "constant":
        x[0, :32] = np.float32(scale)
    elif special == "ties":  # values on the rounding grid's half points
        x[0, :32] = (np.arange(32, dtype=np.float32) - 16.5) * np.float32(scale)
    elif special == "tiny":
        x[0, :32] *= np.float32(1e-30)
    return x


SHAPES = dict(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 9),
    blocks=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 37.0, 6e4]),
    special=st.sampled_from(["none", "zeros", "constant", "ties", "tiny"]),
)


@pytest.mark.parametrize("name", BLOCK32)
@settings(max_examples=40, deadline=None)
@given(**SHAPES)
def test_quantize_equals_gguf_bytes(name, seed, rows, blocks, scale, special):
    x = sample(seed, rows, blocks, scale, special)
    ref = gguf.quants.quantize(x, gguf_type(name))
    ours = quantize_gguf(torch.from_numpy(x), name)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("name", BLOCK32)
@settings(max_examples=40, deadline=None)
@given(**SHAPES)
def test_dequantize_equals_gguf_bitwise(name, seed, rows, blocks, scale, special):
    x = sample(seed, rows, blocks, scale, special)
    raw = gguf.quants.quantize(x, gguf_type(name))
    ref = gguf.quants.dequantize(raw, gguf_type(name))
    ours = dequantize_gguf(torch.from_numpy(raw), name, x.shape)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 4), blocks=st.integers(1, 3))
def test_k_quant_dequantize_equals_gguf(name, seed, rows, blocks):
    # Random bytes are valid k-quant blocks (any scale byte is meaningful); keep the float16
    # super-block scales finite so NaN payloads do not enter the comparison.
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * blocks, type_size(name)), dtype=np.uint8)
    for start in (0, 2) if name != "q6_k" else (208,):
        finite = rng.uniform(-2, 2, (rows * blocks, 1)).astype(np.float16)
        raw[:, start : start + 2] = finite.view(np.uint8)
    raw = raw.reshape(rows, blocks * type_size(name))
    ref = gguf.quants.dequantize(raw, gguf_type(name))
    ours = dequantize_gguf(torch.from_numpy(raw), name, (rows, blocks * 256))
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", GGUF_TRAINABLE_TYPES)
def test_block_sizes_match_ggml(name):
    assert (block_size(name), type_size(name)) == gguf.GGML_QUANT_SIZES[gguf_type(name)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_other_dtype_is_float32_rounded_once(dtype):
    x = torch.randn(40, 96)
    blocks = quantize_gguf(x, "q4_1")
    ref = dequantize_gguf(blocks, "q4_1", x.shape).to(dtype)
    assert torch.equal(dequantize_gguf(blocks, "q4_1", x.shape, dtype), ref)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_gguf(torch.randn(4, 33), "q4_0")
    with pytest.raises(ValueError, match="unsupported GGUF block format 'q3_k'"):
        quantize_gguf(torch.randn(4, 32), "q3_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_gguf(torch.randn(4, 128), "q4_k")
    with pytest.raises(ValueError, match="needs 36 bytes"):
        dequantize_gguf(torch.zeros(35, dtype=torch.uint8), "q4_0", (2, 32))
    with pytest.raises(ValueError, match="must be uint8"):
        GGUFTensor(torch.zeros(2, 18), (2, 32), torch.float32, "q4_0")
    assert gguf_bytes_shape((3, 64), "q8_0") == (3, 68)
    assert set(GGUF_TRAINABLE_TYPES) <= set(GGUF_QUANT_TYPES)


# ------------------------------------------------------------------------------------------------
# The record and the layers
# ------------------------------------------------------------------------------------------------
def test_record_range_rows_and_state_dict_round_trip():
    w = torch.randn(6, 64)
    rec = GGUFTensor.from_tensor(w, "q4_0")
    dense = rec.dequantize()
    out = torch.empty(50)
    torch.testing.assert_close(rec.dequantize_range(7, 57, out), dense.reshape(-1)[7:57])
    rows = torch.tensor([[5, 0], [2, 2]])
    assert torch.equal(rec.dequantize_rows(rows), dense[rows])
    back = GGUFTensor.from_state_dict(rec.to_state_dict("m."), "m.")
    assert back.quant_type == "q4_0" and torch.equal(back.blocks, rec.blocks)
    assert rec.nbytes * 8 / w.numel() == 4.5
    bad = rec.to_state_dict()
    bad["weight"] = bad["weight"][:, :-1]
    with pytest.raises(ValueError, match="weight: q4_0 blocks"):
        GGUFTensor.from_state_dict(bad)


@pytest.mark.parametrize("name", GGUF_TRAINABLE_TYPES)
def test_linear_gguf_forward_backward_equal_dense_reference(name):
    linear = torch.nn.Linear(2 * block_size(name), 48)
    layer = LinearGGUF.from_linear(linear, name)
    w = layer.dequantize_weight()
    x = torch.randn(5, linear.in_features, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, w, linear.bias))
    y.square().sum().backward()
    x2 = x.detach().requires_grad_()
    torch.nn.functional.linear(x2, w, linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_embedding_gguf_lookup_equals_dense_rows():
    emb = torch.nn.Embedding(20, 64)
    layer = EmbeddingGGUF(GGUFTensor.from_tensor(emb.weight, "q8_0"))
    ids = torch.tensor([[3, 19], [0, 3]])
    assert torch.equal(layer(ids), layer.dequantize_weight()[ids])
    with pytest.raises(IndexError, match="num_embeddings=20"):
        layer(torch.tensor([20]))


@pytest.mark.parametrize("name", BLOCK32)
def test_lora_config_quant_gguf_trains_merges_and_saves(name, tmp_path):
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, quant=name))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, LinearGGUF)
    assert q_proj.base_layer.qweight.quant_type == name
    ids = torch.randint(0, 64, (2, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert q_proj.lora_A["default"].weight.grad is not None
    with torch.no_grad():
        q_proj.lora_B["default"].weight.normal_(0, 0.1)
    before = model(ids).logits
    loraq.save_adapter(model, tmp_path / "adapter")
    again = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, quant=name))
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(ids).logits, before)
    # merging re-quantizes into the same block format; the result stays close
    with pytest.warns(UserWarning, match="re-quantization"):
        loraq.merge(model)
    assert q_proj.base_layer.qweight.quant_type == name
    assert (model(ids).logits - before).abs().max() < 0.5


def test_quant_gguf_leaves_indivisible_layers_dense():
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 8))
    with pytest.warns(UserWarning, match="0 stays dense"):
        loraq.apply(model, loraq.LoraConfig(r=2, quant="q4_0", targets=["0", "1"]))
    assert type(model[0].base_layer) is torch.nn.Linear
    assert isinstance(model[1].base_layer, LinearGGUF)


def test_save_and_load_quantized_keep_gguf_blocks(tmp_path):
    from loraq.io.quantized import load_quantized, save_quantized

    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=2, quant="q4_1", targets=["q_proj"]))
    base = loraq.unload(model)
    save_quantized(base, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    layer = back.model.layers[0].mlp.up_proj
    assert isinstance(layer, LinearGGUF) and layer.qweight.quant_type == "q4_1"
    assert torch.equal(layer.qweight.blocks, base.model.layers[0].mlp.up_proj.qweight.blocks)
    ids = torch.randint(0, 64, (1, 6))
    assert torch.equal(back(ids).logits, base(ids).logits)


def test_linear_gguf_is_a_quantized_base_and_uses_the_scratch():
    layer = LinearGGUF.from_linear(torch.nn.Linear(64, 40, bias=False), "q4_1")
    assert isinstance(layer, QuantizedBase)
    scratch = DequantScratch()
    dense = layer.dequantize_weight(torch.float32)
    inside = layer.dequantize_weight(torch.float32, scratch=scratch)
    assert torch.equal(inside, dense)
    assert inside.untyped_storage().data_ptr() == scratch.borrow(1, torch.float32).data_ptr()
    layer.set_weight(dense * 2)
    torch.testing.assert_close(layer.dequantize_weight(), dense * 2, atol=0.05, rtol=0.05)
    assert layer.qweight.quant_type == "q4_1"
    with pytest.raises(ValueError, match=r"shape \(40, 64\)"):
        layer.set_weight(torch.zeros(64, 40))


def test_gguf_base_on_gpt2_conv1d_dequantizes_back_to_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    ids = torch.randint(0, 64, (1, 5))
    loraq.apply(model, loraq.LoraConfig(r=2, quant="q8_0", targets=["c_attn"]))
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn.base_layer, LinearGGUF) and attn.base_layer.dense_layout == "conv1d"
    before = model(ids).logits
    dequantize_model(model)
    assert type(attn.base_layer) is Conv1D
    torch.testing.assert_close(model(ids).logits, before)


def test_quant_embeddings_use_the_gguf_format_and_dequantize_back():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6))
    loraq.apply(model, loraq.LoraConfig(r=2, quant="q4_0", quant_embeddings=True))
    table = model.model.embed_tokens
    assert isinstance(table, EmbeddingGGUF) and table.qweight.quant_type == "q4_0"
    assert "quant_type=q4_0" in repr(table)
    before = model(ids).logits
    dequantize_model(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(model(ids).logits, before)


def test_embedding_gguf_refuses_other_records():
    from loraq.quant import QuantizedTensor

    nf4 = QuantizedTensor.from_tensor(torch.randn(4, 64), 64, "nf4", False)
    with pytest.raises(ValueError, match="2-D GGUFTensor"):
        EmbeddingGGUF(nf4)
    with pytest.raises(TypeError, match="must be a GGUFTensor"):
        LinearGGUF(nf4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"])  # dequant.c's
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_the_pure_path_bit_for_bit(monkeypatch, name, dtype):
    from loraq.native import dequant as cpu

    if cpu.mode() == "off" or not cpu.available():
        pytest.skip("compiled kernel off or unbuildable here")
    x = torch.randn(300, 1024) * 3
    x[0, :32] = 0
    x[1, :32] *= 1e-6  # float16 scales that are subnormal
    blocks = quantize_gguf(x, name)
    out = torch.empty(x.numel(), dtype=dtype)
    monkeypatch.setattr(cpu, "_PARALLEL_MIN", 1 << 16)  # slices across threads at this size
    count = x.numel() // block_size(name)
    assert cpu.dequantize_gguf_into(blocks, name, 0, count, out)  # several threads
    with monkeypatch.context() as m:
        m.setattr(cpu, "_library", lambda: None)
        want = dequantize_gguf(blocks, name, x.shape, dtype)
        rec = GGUFTensor.from_tensor(x, name)
        part = rec.dequantize_range(96, 96 + 64 * 5, torch.empty(64 * 5, dtype=dtype)).clone()
    assert torch.equal(_bits(out.view(x.shape)), _bits(want))
    assert torch.equal(_bits(dequantize_gguf(blocks, name, x.shape, dtype)), _bits(want))
    got = rec.dequantize_range(96, 96 + 64 * 5, torch.empty(64 * 5, dtype=dtype))
    assert torch.equal(_bits(got), _bits(part))


@pytest.mark.parametrize("name", BLOCK32)
def test_pure_path_equals_gguf_bitwise_too(monkeypatch, name):
    from loraq.native import dequant as cpu

    monkeypatch.setattr(cpu, "_library", lambda: None)
    x = sample(7, 5, 4, 37.0, "ties")
    raw = gguf.quants.quantize(x, gguf_type(name))
    ref = gguf.quants.dequantize(raw, gguf_type(name))
    ours = dequantize_gguf(torch.from_numpy(raw), name, x.shape)
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


def test_compiled_kernel_reads_every_float16_scale_exactly():
    # every float16 bit pattern (NaNs aside) as a q8_0 block scale with code 1: the kernel's
    # half -> float conversion (F16C where the CPU has it, else bit arithmetic) must give the
    # IEEE value numpy gives, subnormals, zeros of both signs and infinities included
    from loraq.native import dequant as cpu

    if cpu.mode() == "off" or not cpu.available():
        pytest.skip("compiled kernel off or unbuildable here")
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[~np.isnan(halves)]
    blocks = np.zeros((len(halves), 34), dtype=np.uint8)
    blocks[:, :2] = halves.view(np.uint8).reshape(-1, 2)
    blocks[:, 2] = 1
    out = torch.empty(len(halves) * 32, dtype=torch.float32)
    assert cpu.dequantize_gguf_into(torch.from_numpy(blocks), "q8_0", 0, len(halves), out)
    want = torch.from_numpy(halves.astype(np.float32))
    assert torch.equal(_bits(out.view(-1, 32)[:, 0].contiguous()), _bits(want))
