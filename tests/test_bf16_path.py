"""The bf16 path, on every machine: ``compute_dtype: auto`` resolved to bfloat16 (as on a CPU with
AVX512-BF16/AMX or an Ampere GPU, where most users run), autocast, bf16 dequantization, LoRA and
QLoRA training steps against float32, and ``loraq train`` in bfloat16.

Where the CPU has no native bf16 (AVX2-only) PyTorch emulates it: correct, only slower, so the
models here are tiny. Bounds come from :func:`conftest.tolerance` for bfloat16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import loraq
from conftest import assert_close_in, pattern_config, randomize_trainable, tiny_llama, tolerance
from loraq import cli
from loraq.core.precision import (
    CPU_BF16_ENV,
    autocast_dtype,
    autocast_for,
    fast_bf16,
    resolve_compute_dtype,
)
from loraq.native import dequant as compiled
from loraq.quant import dequantize_4bit, dequantize_8bit, quantize_4bit, quantize_8bit

BF16 = torch.bfloat16
HIDDEN = 32  # tiny_llama: hidden 32, MLP 64, 2 layers
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


def test_auto_resolves_to_bf16_on_a_bf16_cpu(cpu_bf16) -> None:
    assert fast_bf16("cpu")
    assert resolve_compute_dtype("auto", "cpu") == BF16
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    loraq.quantize_model(model, loraq.LoraConfig(quant="nf4", compute_dtype="auto"))
    assert model[0].compute_dtype == BF16


def test_the_override_switches_both_ways(monkeypatch) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "off")
    assert not fast_bf16("cpu") and resolve_compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert fast_bf16("cpu") and resolve_compute_dtype("auto", "cpu") == BF16
    monkeypatch.setenv(CPU_BF16_ENV, "sometimes")
    with pytest.raises(ValueError, match=r"LORAQ_CPU_BF16='sometimes'.*auto.*off.*on"):
        resolve_compute_dtype("auto", "cpu")


def test_autocast_for_bf16_and_its_float32_no_op() -> None:
    with autocast_for(BF16, "cpu"):
        assert autocast_dtype("cpu") == BF16
        assert (torch.randn(4, 8) @ torch.randn(8, 4)).dtype == BF16
    with autocast_for(torch.float32, "cpu"):
        assert autocast_dtype("cpu") is None


@pytest.mark.parametrize("kernel", ["compiled", "pure"])
def test_bf16_dequantize_is_float32_rounded_once(kernel: str, monkeypatch) -> None:
    # bf16 dequantization rounds the float32 product to nearest even, once: bit-identical
    if kernel == "pure":
        monkeypatch.setattr(compiled, "_library", lambda: None)
    elif compiled.mode() == "off" or not compiled.available():
        pytest.skip("compiled kernel off or unbuildable here")
    weight = torch.randn(96, 128)
    q4 = quantize_4bit(weight, 64, "nf4", True)
    assert dequantize_4bit(q4, BF16).dtype == BF16
    assert torch.equal(dequantize_4bit(q4, BF16), dequantize_4bit(q4, torch.float32).to(BF16))
    q8 = quantize_8bit(weight, 256)
    assert torch.equal(dequantize_8bit(q8, BF16), dequantize_8bit(q8, torch.float32).to(BF16))


@pytest.mark.parametrize("quant", ["nf4", "int8", "q4_0"])
def test_quantized_layer_in_bf16_tracks_float32(quant: str) -> None:
    linear = torch.nn.Linear(64, 64)
    layers = {}
    for dtype in ("float32", "bfloat16"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
        model[0].load_state_dict(linear.state_dict())
        loraq.quantize_model(model, loraq.LoraConfig(quant=quant, compute_dtype=dtype))
        layers[dtype] = model[0]
    x = torch.randn(5, 64)
    want = layers["float32"](x)
    got = layers["bfloat16"](x)
    assert got.dtype == torch.float32  # output in the input's dtype
    assert_close_in(got, want, BF16, 64)


def _training_step(dtype: torch.dtype, quant: str | None):
    """Loss, logits and LoRA gradients of one step on the tiny Llama, computing in ``dtype``."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=HIDDEN)
    config = loraq.LoraConfig(
        r=4, alpha=8, targets="all-linear", quant=quant, compute_dtype=str(dtype).split(".")[1]
    )
    loraq.apply(model, config)
    torch.manual_seed(1)
    randomize_trainable(model, 0.1)  # B is not zero: every LoRA gradient is live
    model.train()
    with autocast_for(dtype, "cpu"):
        with torch.no_grad(), loraq.disable_adapters(model):
            base = model(input_ids=TOKENS).logits.float()
        out = model(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    params = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads, params, base


@pytest.mark.parametrize("quant", [None, "nf4"], ids=["lora", "qlora"])
def test_bf16_training_step_tracks_float32(quant: str | None) -> None:
    loss32, logits32, grads32, _, base32 = _training_step(torch.float32, quant)
    loss16, logits16, grads16, params16, _ = _training_step(BF16, quant)
    assert logits16.dtype == BF16  # autocast ran the matmuls in bf16
    assert set(params16.values()) == {torch.float32}  # master weights stay float32
    # Forward: 2 decoder layers (attention, MLP) of widths <= 64, then the head.
    depth = 2 * 2 + 1
    bound = tolerance(BF16, 2 * HIDDEN, depth)
    # the bound is tight enough to see the adapters: without them the logits fall outside it
    assert float((base32 - logits32).abs().max()) > 3 * bound
    assert_close_in(logits16, logits32, BF16, 2 * HIDDEN, depth)
    assert_close_in(loss16, loss32, BF16, 2 * HIDDEN, depth)
    assert grads16.keys() == grads32.keys() and grads32
    for name, grad in grads32.items():
        assert grads16[name] is not None and grads16[name].dtype == torch.float32, name
        assert float(grad.abs().max()) > 0, name
        # backward goes down the same layers again, so twice the depth
        scaled = grads16[name] / grad.abs().max()
        assert_close_in(scaled, grad / grad.abs().max(), BF16, 2 * HIDDEN, 2 * depth)


@pytest.mark.parametrize("how", ["bfloat16", "auto on a bf16 CPU"])
def test_loraq_train_in_bf16(how: str, tmp_path: Path, llama_dir, monkeypatch, capsys) -> None:
    monkeypatch.setenv(CPU_BF16_ENV, "on" if how.startswith("auto") else "off")
    dtype = how.split()[0]
    config = pattern_config(
        tmp_path, llama_dir, {"r": 4, "alpha": 8, "quant": "nf4", "compute_dtype": dtype}
    )
    code = cli.main(["train", str(config), "--max_steps", "2", "--eval_every", "null"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "bfloat16 compute" in out.out + out.err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
