"""QLoRA: adapters over a quantized frozen base, QLoRALayer, k-bit adapters, quantized embeddings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraq
from conftest import minilm_path, tiny_gpt2, tiny_llama
from loraq.layers.adapter_quant import dequantize_codes, quantize_codes, round_to_grid
from loraq.layers.quantized import Embedding4bit, Linear4bit, Linear8bit


def _train(model: nn.Module, tokens: torch.Tensor, steps: int, lr: float = 2e-2) -> list[float]:
    opt = torch.optim.AdamW(loraq.trainable_parameters(model), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("weight_")
    }


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_trains_tiny_models_and_keeps_base_codes(make, quant: str) -> None:
    model = make()
    cfg = loraq.LoraConfig(
        r=8, alpha=16, targets="all-linear", quant=quant, modules_to_save=["lm_head"]
    )
    loraq.apply(model, cfg)
    quantized = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bit))]
    assert len(quantized) == (14 if make is tiny_llama else 8)
    codes = _buffers(model)
    assert codes
    losses = _train(model, torch.arange(16).repeat(4, 1) % 64, steps=25)
    assert losses[-1] < 0.3 * losses[0]
    after = _buffers(model)
    assert all(torch.equal(after[n], codes[n]) for n in codes)


def test_qlora_real_minilm_bits_per_param_training_and_frozen_codes() -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path())
    tokens = torch.randint(1000, 5000, (4, 16))
    with torch.no_grad():
        target = model(tokens).last_hidden_state.roll(1, 0)
    loraq.apply(model, loraq.LoraConfig(r=8, targets="all-linear", quant="nf4", double_quant=True))
    s = loraq.summary(model)
    # 4 bits + 8/64 for the 8-bit absmax codes + 32/(64*256) for their scales (+ per-tensor offset)
    assert s.quantized_bits_per_param == pytest.approx(4.127, abs=0.001)
    # q, k, v, o in 6 layers + the pooler (384x384), and the two 384x1536 MLP matrices per layer
    assert s.quantized_params == 25 * 384 * 384 + 12 * 384 * 1536
    codes = _buffers(model)
    opt = torch.optim.AdamW(loraq.trainable_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = (model(tokens).last_hidden_state - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    after = _buffers(model)
    assert all(torch.equal(after[n], codes[n]) for n in codes)


def test_quant_skip_and_head_stay_dense() -> None:
    model = tiny_llama()
    loraq.apply(
        model, loraq.LoraConfig(r=2, targets=["q_proj"], quant="nf4", quant_skip=["down_proj"])
    )
    assert isinstance(model.lm_head, nn.Linear)
    assert all(type(layer.mlp.down_proj) is nn.Linear for layer in model.model.layers)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)


def test_fused_adapter_over_quantized_base_matches_reference() -> None:
    lin = nn.Linear(64, 32)
    for compute in (torch.float32, torch.bfloat16):
        layer = loraq.QLoRALayer(lin, rank=4, alpha=8, compute_dtype=compute)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
        x = torch.randn(5, 64, requires_grad=True)
        out = layer(x)
        base = layer.base_layer
        ref_base = base(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        ref = ref_base + (2.0 * (x @ a.t()) @ b.t()).to(ref_base.dtype)
        tol = 1e-5 if compute == torch.float32 else 2e-2
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, a, b), g)
        want = torch.autograd.grad(ref, (x, a, b), g)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=tol, atol=tol)
        assert out.dtype == x.dtype


def test_qlora_layer_bits_and_errors() -> None:
    assert isinstance(loraq.QLoRALayer(nn.Linear(64, 8), rank=2, bits=8).base_layer, Linear8bit)
    assert isinstance(loraq.QLoRALayer(nn.Linear(64, 8), rank=2).base_layer, Linear4bit)
    with pytest.raises(ValueError, match="bits=3"):
        loraq.QLoRALayer(nn.Linear(64, 8), rank=2, bits=3)
    with pytest.raises(TypeError, match="Conv2d"):
        loraq.QLoRALayer(nn.Conv2d(3, 3, 1), rank=2)
    with pytest.raises(ValueError, match="2..8"):
        loraq.QLoRALayer(nn.Linear(64, 8), rank=2, quantize_adapters=9)


def test_quantize_adapters_forward_uses_only_grid_values() -> None:
    layer = loraq.QLoRALayer(nn.Linear(64, 16), rank=4, quantize_adapters=4)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    a_grid, b_grid = layer.adapter_weights("default")
    for w, grid in (
        (layer.lora_A["default"].weight, a_grid),
        (layer.lora_B["default"].weight, b_grid),
    ):
        scale = w.detach().abs().amax(dim=1) / 7
        steps = grid.detach() / scale[:, None]
        assert torch.equal(steps, steps.round()) or (steps - steps.round()).abs().max() < 1e-4
        assert steps.abs().max() <= 7 + 1e-4
        assert len(torch.unique(steps.round())) <= 15
        assert not torch.equal(grid, w)
    seen = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    x = torch.randn(3, 64)
    out = layer(x)
    handle.remove()
    ref = layer.base_layer(x) + 1.0 * (x @ a_grid.t()) @ b_grid.t()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # straight-through: the gradient reaching the float weights is the grid weights' gradient
    g = torch.randn_like(out)
    got = torch.autograd.grad(layer(x), layer.lora_A["default"].weight, g)[0]
    a_leaf = a_grid.detach().requires_grad_(True)
    want = torch.autograd.grad(
        layer.base_layer(x) + (x @ a_leaf.t()) @ b_grid.detach().t(), a_leaf, g
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_adapter_codes_round_trip_and_size() -> None:
    w = torch.randn(8, 100)
    for bits in (2, 4, 8):
        codes, scale = quantize_codes(w, bits)
        assert codes.dtype == torch.int8 and codes.abs().max() <= 2 ** (bits - 1) - 1
        torch.testing.assert_close(dequantize_codes(codes, scale), round_to_grid(w, bits).detach())
        err = (dequantize_codes(codes, scale) - w).abs().max()
        assert err <= scale.max() / 2 + 1e-6
    zero_codes, zero_scale = quantize_codes(torch.zeros(2, 3), 4)
    assert torch.equal(dequantize_codes(zero_codes, zero_scale), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="int8"):
        dequantize_codes(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_codes(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))


def test_adapter_bits_in_config_applies_to_every_layer() -> None:
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets="all-linear", adapter_bits=3))
    layers = [m for m in model.modules() if isinstance(m, loraq.LoRALayer)]
    assert layers and all(m.adapter_bits == {"default": 3} for m in layers)
    losses = _train(model, torch.arange(16).repeat(2, 1), steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_quant_embeddings_store_tables_in_nf4() -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path())
    tokens = torch.randint(1000, 5000, (2, 10))
    with torch.no_grad():
        ref = model(tokens).last_hidden_state
    plain_q = loraq.apply(
        AutoModel.from_pretrained(minilm_path()),
        loraq.LoraConfig(targets="all-linear", quant="nf4"),
    )
    loraq.apply(model, loraq.LoraConfig(targets="all-linear", quant="nf4", quant_embeddings=True))
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, Embedding4bit)
    table = emb.dequantize_weight()
    ids = torch.tensor([[3, 7, 2000]])
    assert torch.equal(emb(ids), F.embedding(ids, table))
    s_q, s_plain = loraq.summary(model), loraq.summary(plain_q)
    assert s_q.bytes["base_dense"] < 0.1 * s_plain.bytes["base_dense"]
    assert s_q.total_bytes < 0.35 * s_plain.total_bytes
    with torch.no_grad():
        out = model(tokens).last_hidden_state
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.95


def test_merge_on_quantized_base_reports_error_and_dense_unload_is_exact() -> None:
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj", "up_proj"], quant="nf4"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    tokens = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits
    dense = loraq.unload(model, dense=True)
    assert not any(isinstance(m, (Linear4bit, loraq.LoRALayer)) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens).logits, expected, rtol=1e-4, atol=1e-5)

    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"], quant="nf4"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    with pytest.warns(UserWarning, match="re-quantization changed weights by up to"):
        loraq.merge(model)
    assert model.loraq_merge_error > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loraq.unmerge(model)
