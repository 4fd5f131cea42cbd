"""The packed GGUF matmul (decode steps read q8_0/q4_0/q4_1 blocks inside the dot products)
against its reference: dequantize the whole weight, then ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraq.layers.gguf import PACKED_MAX_ROWS, LinearGGUF
from loraq.native import dequant as cpu
from loraq.quant.gguf_tensor import GGUFTensor

needs_kernel = pytest.mark.skipif(
    cpu.mode() == "off" or not cpu.available(), reason="compiled kernel off or unbuildable here"
)
FORMATS = ["q8_0", "q4_0", "q4_1"]
# float32 unit roundoff: any order of summing K products is within K*u*sum|x*w| of the exact
# sum (Higham's gamma_K); two orders (kernel, BLAS) are within twice that of each other.
UNIT = 2.0**-24


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    return 2 * k * UNIT * (x.double().abs() @ w.double().abs().t())


@needs_kernel
@pytest.mark.parametrize("quant_type", FORMATS)
def test_decoded_blocks_equal_the_reference_dequantization(quant_type):
    # one-hot rows pick single weights: every product is exact and every sum adds zeros,
    # so the kernel's decoded values must equal the reference dequantization bit for bit
    rec = GGUFTensor.from_tensor(torch.randn(40, 96), quant_type)
    eye = torch.eye(96)
    got = cpu.gguf_matmul(eye, rec.blocks, quant_type)
    assert got is not None and torch.equal(got.t(), rec.dequantize(torch.float32))


@needs_kernel
@pytest.mark.parametrize("quant_type", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, PACKED_MAX_ROWS])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (70, 1536)])
def test_kernel_equals_reference_within_rounding(quant_type, rows, shape):
    lin = nn.Linear(shape[1], shape[0])
    layer = LinearGGUF.from_linear(lin, quant_type)
    x = torch.randn(rows, shape[1])
    with torch.no_grad():
        assert layer.reads_packed(x)
        got = layer(x)
        w = layer.dequantize_weight()
        want = F.linear(x, w, layer.bias)
    err = (got.double() - want.double()).abs()
    # the bias add rounds once more, on both sides
    assert (err <= _bound(x, w) + 2 * UNIT * want.double().abs()).all()


@needs_kernel
def test_layer_takes_the_packed_path_only_where_it_applies(monkeypatch):
    layer = LinearGGUF.from_linear(nn.Linear(64, 32), "q4_1")
    calls = []
    real = cpu.gguf_matmul
    monkeypatch.setattr("loraq.layers.gguf.gguf_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 3, 32) and len(calls) == 1
        layer(torch.randn(PACKED_MAX_ROWS + 1, 64))  # prefill-sized: dequantize + BLAS
    assert len(calls) == 1
    layer(torch.randn(1, 64, requires_grad=True))  # recording a gradient: the autograd path
    assert len(calls) == 1
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.float64))
    assert len(calls) == 1


def test_fallback_without_kernel_is_the_reference(monkeypatch):
    monkeypatch.setattr(cpu, "_library", lambda: None)
    assert (
        cpu.gguf_matmul(torch.randn(1, 64), torch.zeros(8, 40, dtype=torch.uint8), "q4_1") is None
    )
    layer = LinearGGUF.from_linear(nn.Linear(64, 8), "q4_1")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize_weight(), layer.bias))


@needs_kernel
def test_unfit_inputs_are_refused_not_crashed():
    rec = GGUFTensor.from_tensor(torch.randn(8, 64), "q4_0")
    assert cpu.gguf_matmul(torch.randn(1, 64, device="meta"), rec.blocks, "q4_0") is None
    assert cpu.gguf_matmul(torch.randn(1, 64).t(), rec.blocks, "q4_0") is None  # wrong shape
    assert cpu.gguf_matmul(torch.randn(1, 64), rec.blocks, "q4_1") is None  # wrong row bytes
    assert cpu.gguf_matmul(torch.randn(1, 64), rec.blocks, "q6_k") is None  # not handled
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.randn(1, 64)
        assert cpu.gguf_matmul(fake, rec.blocks, "q4_0") is None
    assert cpu.gguf_matmul(torch.randn(0, 64), rec.blocks, "q4_0").shape == (0, 8)
