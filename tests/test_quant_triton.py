"""Triton dequantize kernels, run by the Triton interpreter on CPU, against the PyTorch reference."""

from __future__ import annotations

import os

import pytest
import torch

from loraq.native import dequant as cpu
from loraq.native import triton_dequant
from loraq.quant import dequantize_4bit, dequantize_8bit, quantize_4bit, quantize_8bit

pytestmark = pytest.mark.skipif(not triton_dequant.available(), reason="triton not installed")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cpu, "_library", lambda: None)  # the reference is the pure path


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("shape", [(33, 70), (1, 1001)])
def test_triton_4bit_equals_reference(quant_type, double_quant, blocksize, shape):
    q = quantize_4bit(torch.randn(shape) * 0.05, blocksize, quant_type, double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(q.numel, dtype=dtype)
        assert triton_dequant.dequantize_4bit_into(
            q.packed, q.block_absmax(), q.code, blocksize, q.numel, out
        )
        assert torch.equal(out.view(q.shape), dequantize_4bit(q, dtype)), dtype


def test_triton_8bit_equals_reference():
    q = quantize_8bit(torch.randn(20, 300), 256)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(q.codes.numel(), dtype=dtype)
        assert triton_dequant.dequantize_8bit_into(
            q.codes, q.absmax, q.code, 256, q.codes.numel(), out
        )
        assert torch.equal(out.view(q.shape), dequantize_8bit(q, dtype))


def test_cpu_tensors_are_declined_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = quantize_4bit(torch.randn(8, 8), 64, "nf4", False)
    out = torch.empty(64)
    assert not triton_dequant.dequantize_4bit_into(q.packed, q.absmax, q.code, 64, 64, out)
    assert os.environ.get("TRITON_INTERPRET") is None
