"""Quantized base layers: exact forward, input gradients only, buffers, state dicts, embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraq.layers.quantized import Embedding4bit, Linear4bit, Linear8bit, release_scratch
from loraq.quant import QuantizedTensor, QuantizedTensor8, quantize_4bit

BNB_KEYS = [
    "weight",
    "bias",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
]


def make_linear4(in_f=96, out_f=80, bias=True, compute_dtype=torch.float32, **kwargs):
    return Linear4bit.from_linear(
        nn.Linear(in_f, out_f, bias=bias), compute_dtype=compute_dtype, **kwargs
    )


def make_linear8(in_f=96, out_f=80, bias=True, compute_dtype=torch.float32):
    return Linear8bit.from_linear(nn.Linear(in_f, out_f, bias=bias), compute_dtype=compute_dtype)


def reference(layer, x):
    """F.linear on the dequantized weight, everything in the compute dtype."""
    dtype = layer.compute_dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return F.linear(x.to(dtype), layer.dequantize_weight(dtype), bias)


# ------------------------------------------------------------------------------------------------
# Forward and backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: make_linear4(**kw),
        lambda **kw: make_linear4(quant_type="fp4", double_quant=False, blocksize=32, **kw),
        lambda **kw: make_linear4(in_f=50, out_f=7, **kw),  # blocks span rows, odd numel
        lambda **kw: make_linear4(bias=False, **kw),
        lambda **kw: make_linear8(**kw),
        lambda **kw: make_linear8(in_f=50, out_f=7, **kw),
    ],
    ids=["nf4-dq", "fp4-bs32", "nf4-odd", "no-bias", "int8", "int8-odd"],
)
@pytest.mark.parametrize("x_shape", [(1, -1), (5, -1), (2, 3, -1)])
def test_forward_equals_f_linear_on_dequantized_weight(make, compute_dtype, x_shape):
    layer = make(compute_dtype=compute_dtype)
    x = torch.randn(*x_shape[:-1], layer.in_features).to(compute_dtype)
    y = layer(x)
    assert y.dtype == compute_dtype and y.shape == (*x_shape[:-1], layer.out_features)
    assert torch.equal(y, reference(layer, x))


def test_forward_exact_on_a_weight_larger_than_a_cache_chunk():
    layer = make_linear4(in_f=1024, out_f=700)  # 716,800 weights: several dequantization chunks
    x = torch.randn(33, 1024)
    assert torch.equal(layer(x), reference(layer, x))


def test_output_follows_the_input_dtype():
    layer = make_linear4(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, reference(layer, x).float())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [make_linear4, make_linear8], ids=["4bit", "8bit"])
def test_input_gradient_equals_dense_reference_and_weight_gets_none(make, compute_dtype):
    layer = make(compute_dtype=compute_dtype)
    x = torch.randn(3, 4, layer.in_features, dtype=compute_dtype, requires_grad=True)
    grad = torch.randn(3, 4, layer.out_features, dtype=compute_dtype)
    layer(x).backward(grad)
    ours = x.grad.clone()
    x.grad = None
    reference(layer, x).backward(grad)
    assert torch.equal(ours, x.grad)
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())
    assert all(not b.requires_grad for b in layer.buffers())


def test_unfrozen_bias_gets_its_gradient():
    layer = make_linear4()
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 96)
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((80,), 6.0))


def test_forward_saves_nothing_for_backward_and_keeps_no_dense_weight():
    layer = make_linear4()
    x = torch.randn(8, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # neither x nor a dense weight is kept for backward
    y.sum().backward()
    dense_numel = layer.out_features * layer.in_features
    tensors = list(layer.buffers()) + list(layer.parameters())
    tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert not any(t.is_floating_point() and t.numel() >= dense_numel for t in tensors)


def test_training_forward_after_inference_mode():
    layer = make_linear4()
    x = torch.randn(2, 96)
    release_scratch()  # the next call allocates the scratch buffer inside inference mode
    with torch.inference_mode():
        y0 = layer(x)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.equal(layer(x), y0) and xg.grad is not None


def test_wrong_input_width_is_named():
    with pytest.raises(ValueError, match="last dimension 96"):
        make_linear4()(torch.randn(2, 95))


# ------------------------------------------------------------------------------------------------
# Buffers, dtype conversion, attributes
# ------------------------------------------------------------------------------------------------
def test_model_to_bfloat16_keeps_the_quantized_bytes():
    model = nn.Sequential(make_linear4(), nn.ReLU(), make_linear8(in_f=80, out_f=16))
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert {n.split(".")[-1] for n in before} >= {
        "weight_packed",
        "weight_absmax_codes",
        "weight_codes",
    }
    for convert in (
        lambda m: m.to(torch.bfloat16),
        lambda m: m.half(),
        lambda m: m.float(),
        lambda m: m.to("cpu"),
    ):
        convert(model)
        for name, buf in model.named_buffers():
            assert buf.dtype == before[name].dtype and torch.equal(buf, before[name]), name
    model.to(torch.bfloat16)
    assert model[0].bias.dtype == torch.bfloat16
    x = torch.randn(3, 96)
    assert model(x).shape == (3, 16)


def test_attributes_and_repr():
    layer = make_linear4()
    assert (layer.in_features, layer.out_features) == (96, 80)
    assert layer.weight.shape == (80, 96) and layer.weight.dtype == torch.float32
    assert isinstance(layer.qweight, QuantizedTensor) and layer.qweight.double_quant
    assert not layer.bias.requires_grad
    text = repr(layer)
    for part in (
        "in_features=96",
        "out_features=80",
        "quant_type=nf4",
        "blocksize=64",
        "double_quant=True",
    ):
        assert part in text
    assert isinstance(make_linear8().qweight, QuantizedTensor8)
    assert "blocksize=256" in repr(make_linear8())


def test_set_weight_requantizes():
    layer = make_linear4()
    target = torch.randn(80, 96) * 0.1
    layer.set_weight(target)
    assert torch.equal(
        layer.dequantize_weight(), quantize_4bit(target, 64, "nf4", True).dequantize()
    )
    with pytest.raises(ValueError, match=r"shape \(80, 96\)"):
        layer.set_weight(torch.randn(3, 3))


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="2-D"):
        Linear4bit(quantize_4bit(torch.randn(64)))
    with pytest.raises(ValueError, match="compute_dtype"):
        make_linear4(compute_dtype=torch.int32)


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------
def test_state_dict_has_the_bnb_keys_and_round_trips():
    layer = make_linear4(in_f=128, out_f=64)
    sd = layer.state_dict()
    assert list(sd) == BNB_KEYS
    other = make_linear4(in_f=128, out_f=64, double_quant=False)
    result = other.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert other.qweight.double_quant
    x = torch.randn(5, 128)
    assert torch.equal(other(x), layer(x))
    model = nn.Sequential(layer)
    assert set(model.state_dict()) == {"0." + k for k in BNB_KEYS}


def test_state_dict_matches_bnb_linear4bit_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(128, 64)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4"
    )
    theirs.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    theirs = theirs.to("cpu").train()  # train mode: bnb keeps the standard layout on CPU
    ours = Linear4bit.from_linear(dense, "nf4", 64, double_quant=True)
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(their_sd) == list(our_sd)
    for key in their_sd:
        assert (
            their_sd[key].dtype == our_sd[key].dtype and their_sd[key].shape == our_sd[key].shape
        ), key
    # Theirs into ours: same packed bytes and the forward of their weight.
    loaded = make_linear4(in_f=128, out_f=64)
    loaded.load_state_dict(their_sd)
    assert torch.equal(loaded.qweight.packed, their_sd["weight"])
    x = torch.randn(4, 128)
    their_weight = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(loaded(x), F.linear(x, their_weight, theirs.bias))
    # Ours into theirs, through bnb's loader for prequantized weights (as transformers does).
    fresh = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k[len("weight.") :]: v for k, v in our_sd.items() if k.startswith("weight.")}
    fresh.weight = bnb.nn.Params4bit.from_prequantized(
        our_sd["weight"], stats, device="cpu", module=fresh
    )
    fresh.bias = nn.Parameter(our_sd["bias"], requires_grad=False)
    fresh.train()
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))


def test_load_state_dict_reports_missing_and_mismatched_weights():
    layer = make_linear4(in_f=128, out_f=64)
    sd = layer.state_dict()
    result = make_linear4(in_f=128, out_f=64).load_state_dict({"bias": sd["bias"]}, strict=False)
    assert "weight" in result.missing_keys and "weight.absmax" in result.missing_keys
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        make_linear4(in_f=64, out_f=128).load_state_dict(sd)
    broken = dict(sd)
    broken["weight.absmax"] = broken["weight.absmax"].float()
    with pytest.raises(RuntimeError, match="weight.absmax: expected dtype torch.uint8"):
        make_linear4(in_f=128, out_f=64).load_state_dict(broken)


def test_linear8bit_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = make_linear8()
    sd = layer.state_dict()
    assert list(sd) == [
        "weight",
        "bias",
        "weight.absmax",
        "weight.quant_map",
        "weight.quant_state.loraq__dynamic",
    ]
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (80, 96)
    save_file(sd, tmp_path / "l8.safetensors")
    other = make_linear8()
    other.load_state_dict(load_file(tmp_path / "l8.safetensors"))
    x = torch.randn(3, 96)
    assert torch.equal(other(x), layer(x))


def test_a_model_of_quantized_layers_saves_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(make_linear4(), make_linear4(in_f=80, out_f=96))
    save_file(model.state_dict(), tmp_path / "m.safetensors")  # no shared tensors between layers
    copy = nn.Sequential(make_linear4(), make_linear4(in_f=80, out_f=96))
    copy.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(2, 96)
    assert torch.equal(copy(x), model(x))


# ------------------------------------------------------------------------------------------------
# Embedding4bit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dim, blocksize, double_quant", [(128, 64, True), (48, 64, True), (37, 32, False)]
)
def test_embedding_equals_f_embedding_on_dequantized_table(dim, blocksize, double_quant):
    emb = nn.Embedding(101, dim, padding_idx=0)
    layer = Embedding4bit.from_embedding(emb, blocksize=blocksize, double_quant=double_quant)
    table = layer.dequantize_weight()
    for ids in (torch.randint(0, 101, (4, 9)), torch.tensor([100, 0, 5]), torch.tensor(7)):
        out = layer(ids)
        assert out.shape == (*ids.shape, dim)
        assert torch.equal(out, F.embedding(ids, table))
    assert torch.equal(layer.dequantize_weight(torch.bfloat16), table.bfloat16())
    assert torch.equal(
        layer(torch.tensor([3])).squeeze(0),
        quantize_4bit(emb.weight, blocksize, "nf4", double_quant).dequantize()[3],
    )


def test_embedding_dtype_errors_and_state_dict():
    layer = Embedding4bit.from_embedding(nn.Embedding(10, 64).to(torch.bfloat16))
    assert layer(torch.tensor([1, 2])).dtype == torch.bfloat16
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([10]))
    with pytest.raises(ValueError, match="int32 or int64"):
        layer(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="max_norm"):
        Embedding4bit.from_embedding(nn.Embedding(10, 64, max_norm=1.0))
    sd = layer.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in sd
    other = Embedding4bit.from_embedding(nn.Embedding(10, 64).to(torch.bfloat16))
    other.load_state_dict(sd)
    assert torch.equal(other(torch.arange(10)), layer(torch.arange(10)))
    assert "10, 64" in repr(layer)
    before = [b.clone() for b in layer.buffers()]
    layer.float()  # like nn.Embedding, the output follows a float conversion of the module
    assert layer(torch.tensor([1])).dtype == torch.float32
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(before, layer.buffers()))
