"""LoftQ initialisation: the pure math, the whole-model pass, bad input, files both ways."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import loraq
from conftest import minilm_path, tiny_gpt2, tiny_llama
from loraq.layers.loftq import loftq_decompose, low_rank_factors
from loraq.quant import quantize_4bit, quantize_8bit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The eigen-solver on matrices of a few hundred rows gains nothing from threads, and its
    # threads spin for a long time on a busy machine; this keeps the module fast everywhere.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _nf4(target: torch.Tensor):
    q = quantize_4bit(target, 64, "nf4", True)
    return q, q.dequantize(torch.float32)


def _rel(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w.double() - approx.double()).norm() / w.double().norm())


# ---------------------------------------------------------------------------------- pure math
@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_low_rank_factors_are_the_truncated_svd(shape) -> None:
    m = torch.randn(*shape, dtype=torch.float64)
    a, b = low_rank_factors(m, 5, scaling=2.5)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(2.5 * b @ a, best, rtol=0, atol=1e-10)
    assert a.shape == (5, shape[1]) and b.shape == (shape[0], 5)
    # the singular values are split evenly between A and B
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-9, atol=0)


def test_loftq_errors_fall_with_iterations_and_beat_plain_quantization() -> None:
    w = torch.randn(96, 64) @ torch.diag(torch.linspace(3, 0.1, 64)) + 0.05 * torch.randn(96, 64)
    one = loftq_decompose(w, 8, _nf4, scaling=2.0, iters=1)
    five = loftq_decompose(w, 8, _nf4, scaling=2.0, iters=5)
    q_plain = quantize_4bit(w, 64, "nf4", True).dequantize(torch.float32)
    assert one.plain_error == pytest.approx(_rel(w, q_plain), rel=1e-6)
    assert one.error < one.plain_error
    assert five.errors[0] == pytest.approx(one.error, rel=1e-6)
    assert five.error < 0.97 * one.error  # later iterations really improve
    assert five.error == min(five.errors)
    # the reported error is the error of the kept record and factors
    approx = five.stored.dequantize(torch.float32) + 2.0 * five.b @ five.a
    assert _rel(w, approx) == pytest.approx(five.error, rel=1e-5)


@pytest.mark.parametrize("fmt", ["fp4", "int8"])
def test_loftq_takes_any_quantizer(fmt: str) -> None:
    w = torch.randn(64, 64)

    def quantize(t):
        q = quantize_8bit(t, 256) if fmt == "int8" else quantize_4bit(t, 64, fmt, False)
        return q, q.dequantize(torch.float32)

    result = loftq_decompose(w, 4, quantize, scaling=1.0, iters=3)
    assert result.error < result.plain_error


# ---------------------------------------------------------------------------------- whole model
def _minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path()).eval()


def test_loftq_beats_plain_nf4_on_every_minilm_layer() -> None:
    dense = _minilm()
    originals = {
        n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, nn.Linear)
    }
    model = loraq.apply(dense, loraq.LoraConfig(r=8, alpha=16, quant="nf4", init="loftq"))
    report = loraq.loftq_report(model)
    assert len(report) == len(originals) == 37
    for name, layer in model.named_modules():
        if not isinstance(layer, loraq.LoRALayer):
            continue
        w = originals[name]
        plain = quantize_4bit(w, 64, "nf4", True).dequantize(torch.float32)
        loftq = layer.base_matrix() + layer.delta_matrix("default").detach()
        assert _rel(w, loftq) < _rel(w, plain), name
        assert report[name].error == pytest.approx(_rel(w, loftq), rel=1e-4)
    # and in output space: the LoftQ model is closer to the dense one than plain NF4
    ids = torch.randint(1000, 20000, (2, 16))
    with torch.no_grad():
        plain_model = loraq.apply(_minilm(), loraq.LoraConfig(r=8, quant="nf4"))
        reference = _minilm()(input_ids=ids).last_hidden_state
        out_loftq = model(input_ids=ids).last_hidden_state
        out_plain = plain_model(input_ids=ids).last_hidden_state
    assert (out_loftq - reference).norm() < (out_plain - reference).norm()


def test_loftq_iterations_lower_the_error_on_minilm() -> None:
    config = loraq.LoraConfig(r=8, quant="nf4", init="loftq", loftq_iters=3, targets=["query"])
    report = loraq.loftq_report(loraq.apply(_minilm(), config))
    assert len(report) == 6
    for name, layer in report.items():
        assert layer.errors[2] < layer.errors[1] < layer.errors[0] < layer.plain_error, name


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_loftq_on_gpt2_conv1d_and_every_format(quant: str) -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    weights = {
        n: m.weight.detach().t().clone() for n, m in model.named_modules() if hasattr(m, "nf")
    }
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, quant=quant, init="loftq", loftq_iters=2))
    for name, report in loraq.loftq_report(model).items():
        layer = model.get_submodule(name)
        approx = layer.base_matrix() + layer.delta_matrix("default").detach()
        assert _rel(weights[name], approx) == pytest.approx(report.error, rel=1e-4)
        assert report.error < report.plain_error


@pytest.mark.parametrize(("quant", "bits"), [("q4_0", 4), ("q4_1", 4), ("q8_0", 8)])
def test_loftq_on_gguf_block_formats_saves_and_loads(tmp_path, quant: str, bits: int) -> None:
    from transformers import LlamaForCausalLM

    from loraq.layers.gguf import LinearGGUF

    torch.manual_seed(0)
    model = tiny_llama(hidden=64)
    weights = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    }
    config = loraq.LoraConfig(r=4, alpha=8, quant=quant, init="loftq", loftq_iters=3)
    loraq.apply(model, config)
    report = loraq.loftq_report(model)
    assert len(report) == 14
    for name, layer_report in report.items():
        layer = model.get_submodule(name)
        assert isinstance(layer.base_layer, LinearGGUF)
        approx = layer.base_matrix() + layer.delta_matrix("default").detach()
        assert _rel(weights[name], approx) == pytest.approx(layer_report.error, rel=1e-4)
        assert layer_report.error < layer_report.errors[0] < layer_report.plain_error, name
    ids = torch.randint(0, 64, (2, 10))
    expected = _logits(model, ids)
    loraq.save_adapter(model, tmp_path / "adapter")
    loraq.save_quantized(model, tmp_path / "base")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": bits, "loftq_iter": 3}
    base = loraq.load_quantized(tmp_path / "base", LlamaForCausalLM)
    loaded = loraq.load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- bad input
def test_loftq_without_a_quantized_base_names_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"LoraConfig.init='loftq' needs a quantized base.*LoraConfig.quant"
    ):
        loraq.apply(tiny_llama(), loraq.LoraConfig(init="loftq"))


def test_loftq_rank_above_the_layer_names_the_field() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    config = loraq.LoraConfig(r=8, quant="nf4", init="loftq", targets=["2"])
    message = r"LoraConfig.r=8 is invalid for module '2': expected at most min\(in, out\) = 2"
    with pytest.raises(ValueError, match=message):
        loraq.apply(model, config)
    with pytest.raises(ValueError, match=message):
        loraq.apply(model, config, allow_large_rank=True)


def test_loftq_on_an_already_quantized_base_is_refused() -> None:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(quant="nf4"))
    model = loraq.unload(model, merge_adapters=False)
    with pytest.raises(ValueError, match="needs the dense weight of"):
        loraq.apply(model, loraq.LoraConfig(quant="nf4", init="loftq"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loftq_iters": 0}, r"LoraConfig.loftq_iters=0 is invalid"),
        ({"loftq_iters": True}, r"LoraConfig.loftq_iters=True is invalid"),
        (
            {"init": "loftq", "use_dora": True},
            r"LoraConfig.use_dora=True is invalid: expected False with init='loftq'",
        ),
    ],
)
def test_loftq_config_validation(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        loraq.LoraConfig(**fields)


# ---------------------------------------------------------------------------------- files
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loftq_adapter_saves_and_loads_with_its_quantized_base(tmp_path) -> None:
    torch.manual_seed(0)
    dense = tiny_llama()
    fresh = tiny_llama()
    fresh.load_state_dict(dense.state_dict())
    config = loraq.LoraConfig(r=4, alpha=8, quant="nf4", init="loftq", loftq_iters=2)
    model = loraq.apply(dense, config)
    ids = torch.randint(0, 64, (2, 10))
    expected = _logits(model, ids)
    loraq.save_adapter(model, tmp_path / "adapter")
    loraq.save_quantized(model, tmp_path / "base")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # PEFT's own LoftQ recipe: nothing re-runs on load, loftq_config marks the adapter as LoftQ
    assert saved["init_lora_weights"] is True
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}

    from transformers import LlamaForCausalLM

    base = loraq.load_quantized(tmp_path / "base", LlamaForCausalLM)
    loaded = loraq.load_adapter(base, tmp_path / "adapter")
    assert loraq.config_of(loaded).init == "loftq"
    assert loraq.config_of(loaded).loftq_iters == 2
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)

    # replaying LoftQ on the dense weights rebuilds the same base
    replayed = loraq.load_adapter(fresh, tmp_path / "adapter", quant="nf4")
    torch.testing.assert_close(_logits(replayed, ids), expected, rtol=1e-5, atol=1e-5)


def test_loftq_adapter_refuses_a_dense_base(tmp_path) -> None:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, quant="nf4", init="loftq"))
    loraq.save_adapter(model, tmp_path)
    dense = tiny_llama()
    with pytest.raises(
        ValueError, match="LoraConfig.init='loftq' adapter needs the quantized base"
    ):
        loraq.load_adapter(dense, tmp_path)
    assert loraq.adapter_names(dense) == []


def test_peft_loftq_configs_are_read_and_peft_loads_ours(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    from loraq.io.peft_config import lora_config_from_peft

    theirs = peft.LoraConfig(
        r=4,
        target_modules=["q_proj"],
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=3),
    ).to_dict()
    theirs["peft_type"] = "LORA"
    theirs = {k: (sorted(v) if isinstance(v, set) else v) for k, v in theirs.items()}
    config, _ = lora_config_from_peft(json.loads(json.dumps(theirs)))
    assert (config.init, config.loftq_iters) == ("loftq", 3)

    torch.manual_seed(0)
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, alpha=8, quant="nf4", init="loftq"))
    ids = torch.randint(0, 64, (2, 10))
    expected = _logits(model, ids)
    loraq.save_adapter(model, tmp_path)
    # PEFT over the dequantized LoftQ base (what PEFT's recipe loads) gives the same outputs
    import copy

    from loraq.model.quantize import dequantize_model

    base = loraq.unload(dequantize_model(copy.deepcopy(model)), merge_adapters=False)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=1e-5, atol=1e-5)


def test_loftq_matches_peft_loftq_steps_when_alpha_equals_r() -> None:
    """PEFT's loop (bitsandbytes NF4 without double quantization, PEFT's own SVD helper): with
    scaling 1 both reach the same error; with scaling 2 PEFT ignores the scale and loraq wins."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    torch.manual_seed(0)
    w = torch.randn(96, 64) @ torch.diag(torch.linspace(2, 0.1, 64))
    res = w.clone()
    for i in range(3):
        packed, state = bnbf.quantize_4bit(res, blocksize=64, quant_type="nf4")
        q = bnbf.dequantize_4bit(packed, state)
        out = loftq_utils._low_rank_decomposition(w - q, reduced_rank=6)
        if i < 2:
            res = w - out["L"] @ out["R"]
    peft_error = _rel(w, q + out["L"] @ out["R"])

    def nf4(t):
        qt = quantize_4bit(t, 64, "nf4", False)
        return qt, qt.dequantize(torch.float32)

    ours = loftq_decompose(w, 6, nf4, scaling=1.0, iters=3)
    assert ours.errors[-1] == pytest.approx(peft_error, rel=1e-3)
    assert loftq_decompose(w, 6, nf4, scaling=2.0, iters=3).error < _rel(
        w, q + 2 * out["L"] @ out["R"]
    )
