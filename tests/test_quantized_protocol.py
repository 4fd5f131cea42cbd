"""The QuantizedBase Protocol is all loraq needs from a quantized base, and the dequantization
scratch buffer is explicit: a layer says which one it uses."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraq
from loraq.layers import QuantizedBase, QuantizedWeight
from loraq.layers.quantized import (
    SHARED_SCRATCH,
    DequantScratch,
    Embedding4bit,
    Linear4bit,
    Linear8bit,
)


@dataclass
class _RowInt8:
    """A minimal foreign record: int8 codes with one float32 scale per row."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.codes.float() * self.scale[:, None]).to(dtype or torch.float32)


def _row_int8(weight: torch.Tensor) -> _RowInt8:
    scale = weight.detach().abs().amax(dim=1).clamp_min(1e-12) / 127
    return _RowInt8(torch.round(weight.detach() / scale[:, None]).to(torch.int8), scale)


class _RowInt8Linear(nn.Module):
    """A quantized base written against the Protocol only (as a new format would be)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.qweight = _row_int8(linear.weight)
        self.out_features, self.in_features = linear.weight.shape
        self.compute_dtype = torch.float32
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dense_layout = "linear"

    def dequantize_weight(self, dtype=None, *, scratch=None) -> torch.Tensor:
        return self.qweight.dequantize(dtype or self.compute_dtype)

    def set_weight(self, weight: torch.Tensor) -> None:
        self.qweight = _row_int8(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)


def test_loraq_layers_satisfy_the_protocol_and_others_do_not() -> None:
    linear = nn.Linear(64, 32)
    assert isinstance(Linear4bit.from_linear(linear), QuantizedBase)
    assert isinstance(Linear8bit.from_linear(linear), QuantizedBase)
    assert isinstance(Linear4bit.from_linear(linear).qweight, QuantizedWeight)
    assert not isinstance(linear, QuantizedBase)
    assert not isinstance(Embedding4bit.from_embedding(nn.Embedding(16, 64)), QuantizedBase)


def test_a_foreign_quantized_base_gets_adapters_merges_and_unloads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    model[0] = _RowInt8Linear(model[0])
    assert isinstance(model[0], QuantizedBase)
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["0"]))
    layer = model[0]
    assert layer.kind == "linear" and layer.is_quantized
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 64)
    expected = model(x)
    dense_reference = F.linear(x, layer.base_matrix() + layer.delta_matrix("default"), layer.bias)
    torch.testing.assert_close(layer(x), dense_reference)
    assert loraq.summary(model).quantized_params == 64 * 64
    dense = loraq.unload(copy.deepcopy(model), dense=True)
    assert type(dense[0]) is nn.Linear
    torch.testing.assert_close(dense(x), expected, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="re-quantization"):
        loraq.merge(model)
    torch.testing.assert_close(model(x), expected, atol=0.05, rtol=0)  # lossy re-quantization


def test_scratch_is_per_layer_and_explicit() -> None:
    a = Linear4bit.from_linear(nn.Linear(64, 64))
    b = Linear4bit.from_linear(nn.Linear(256, 64))
    assert a.scratch is SHARED_SCRATCH and b.scratch is SHARED_SCRATCH
    own = DequantScratch()
    wb = b.dequantize_weight(scratch=own)
    assert torch.equal(wb, b.dequantize_weight())
    wa = a.dequantize_weight(scratch=own)
    # Both live in the one buffer (sized for the larger layer): a's weight overwrote b's.
    assert wa.data_ptr() == wb.data_ptr()
    assert not torch.equal(wb, b.dequantize_weight())
    fresh = a.dequantize_weight()
    assert fresh.data_ptr() != wa.data_ptr() and torch.equal(fresh, wa)
    x = torch.randn(3, 64)
    with_scratch = a(x)
    a.scratch = None  # fresh tensors per call, same numbers
    assert torch.equal(a(x), with_scratch)
    assert torch.equal(with_scratch, F.linear(x, fresh, a.bias))
    assert math.isclose(own.borrow(4, torch.float32).numel(), 4)
    own.release()


def test_quantized_gpt2_conv1d_records_its_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 16)  # 16 in, 48 out, weight stored (16, 48)
    layer = Linear4bit.from_linear(conv)
    assert layer.dense_layout == "conv1d" and (layer.in_features, layer.out_features) == (16, 48)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), conv(x), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="dense_layout must be one of"):
        Linear4bit(layer.qweight, None, torch.float32, "transposed")
