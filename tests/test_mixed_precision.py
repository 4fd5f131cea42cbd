"""Every dtype combination of the fused LoRA op: base dtype x autocast x dropout, forward and backward.

The reference is the layer's math in float64 with the same dropout mask; the tolerance follows
the lowest precision any matmul of the combination runs in.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraq.core.precision import autocast_dtype, fast_bf16, resolve_compute_dtype
from loraq.layers import fused
from loraq.layers.lora import LoRALayer
from loraq.layers.quantized import Linear4bit, Linear8bit
from loraq.native import bernoulli

BASE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative tolerance (to the output's scale) of one matmul chain in each dtype
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
IN, OUT, RANK, SCALE = 48, 40, 4, 1.5


def _fixed_mask(monkeypatch, p: float, shape) -> torch.Tensor | None:
    if p == 0.0:
        return None
    mask = torch.empty(shape, dtype=torch.uint8).bernoulli_(1.0 - p)
    # handed over packed where the kernel packs (the bit paths for every dtype), else as bytes
    bits = bernoulli.pack_mask(mask)
    keep = (mask, False) if bits is None else (bits, True)
    monkeypatch.setattr(fused, "keep_mask", lambda x, p_: keep)
    return mask


def _build(kind: str, dtype: torch.dtype, p: float) -> tuple[LoRALayer, torch.Tensor, torch.Tensor]:
    """The layer and its base weight and bias as the layer computes with them (float64)."""
    linear = nn.Linear(IN, OUT)
    if kind == "dense":
        base = linear.to(dtype)
        w, b = base.weight, base.bias
    else:
        cls = Linear4bit if kind == "nf4" else Linear8bit
        base = cls.from_linear(linear, compute_dtype=dtype)
        w, b = base.dequantize_weight(torch.float32), base.bias
    layer = LoRALayer(base, rank=RANK, alpha=RANK * SCALE, dropout=p)
    nn.init.normal_(layer.lora_B["default"].weight)  # a fresh B = 0 would hide the adapter
    return layer, w.detach().double(), b.detach().double()


@pytest.mark.parametrize(
    "kind,dtype,amp,p",
    [
        (k, d, a, p)
        for k, d, a, p in itertools.product(
            ["dense", "nf4", "int8"], BASE_DTYPES, [False, True], [0.0, 0.1]
        )
    ],
)
def test_fused_lora_every_dtype_combination(monkeypatch, kind, dtype, amp, p) -> None:
    layer, w, bias = _build(kind, dtype, p)
    layer.train()
    # A dense base sees its own dtype (the model was converted); a quantized one float32 inputs.
    x_dtype = dtype if kind == "dense" else torch.float32
    x = torch.randn(3, 7, IN, dtype=x_dtype, requires_grad=True)
    mask = _fixed_mask(monkeypatch, p, (21, IN))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = layer(x)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.to(y.dtype))

    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    bb = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    x_drop = x64 if mask is None else x64 * mask.view(x.shape).double() / (1 - p)
    ref = F.linear(x64, w, bias) + SCALE * F.linear(F.linear(x_drop, a), bb)
    ref.backward(g)

    low = torch.bfloat16 if amp else dtype
    tol = TOL[low]
    expected_dtype = torch.bfloat16 if amp else x_dtype
    assert y.dtype == expected_dtype
    assert x.grad.dtype == x_dtype
    for name, got, want in [
        ("output", y, ref),
        ("grad x", x.grad, x64.grad),
        ("grad A", layer.lora_A["default"].weight.grad, a.grad),
        ("grad B", layer.lora_B["default"].weight.grad, bb.grad),
    ]:
        if name.startswith("grad ") and name != "grad x":
            assert got.dtype == torch.float32, f"{name} must stay float32 (master weights)"
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= tol * scale * 4, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def test_autocast_quantized_base_dequantizes_straight_to_the_autocast_dtype() -> None:
    linear = nn.Linear(IN, OUT)
    base = Linear4bit.from_linear(linear)
    x = torch.randn(5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(x)
    w = base.dequantize_weight(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), w, base.bias.bfloat16()))
    # the same values as dequantizing to float32 then casting (one rounding either way)
    assert torch.equal(w, base.dequantize_weight(torch.float32).bfloat16())


def test_autocast_backward_outside_the_context_and_float32_masters() -> None:
    layer = LoRALayer(Linear4bit.from_linear(nn.Linear(IN, OUT)), rank=RANK)
    x = torch.randn(4, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().pow(2).mean()
    loss.backward()  # the usual pattern: backward after leaving autocast
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_autocast_dtype_reports_the_active_context() -> None:
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
    assert autocast_dtype("cpu") is None


def test_resolve_compute_dtype() -> None:
    assert resolve_compute_dtype("float32") == torch.float32
    assert resolve_compute_dtype("bfloat16") == torch.bfloat16
    assert resolve_compute_dtype(torch.float16) == torch.float16
    auto = resolve_compute_dtype("auto", "cpu")
    assert auto == (torch.bfloat16 if fast_bf16("cpu") else torch.float32)
    with pytest.raises(ValueError, match="unknown compute dtype 'float8'.*auto"):
        resolve_compute_dtype("float8")


def test_fast_bf16_follows_the_cpu_flags(monkeypatch) -> None:
    from loraq.core import precision

    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)  # the CPU answers, not the override
    precision._cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    try:
        assert fast_bf16("cpu") and resolve_compute_dtype("auto") == torch.bfloat16
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        precision._cpu_has_fast_bf16.cache_clear()
        assert not fast_bf16("cpu") and resolve_compute_dtype("auto") == torch.float32
    finally:
        precision._cpu_has_fast_bf16.cache_clear()
    assert not fast_bf16("meta")
