"""Merging a QLoRA adapter into the dequantized base, the original weights, or requantized;
each merge measured in output space (max logit difference, KL to the unmerged model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import loraq
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from loraq import cli
from loraq.layers.quantized import Linear4bit
from loraq.model.merging import MERGE_TARGETS
from test_train_support import make_tiny_llama, write_config, write_pattern_jsonl


def _qlora_model(seed: int = 0):
    """A tiny Llama with an NF4 base and a non-zero adapter, plus its dense original."""
    torch.manual_seed(seed)
    dense = tiny_llama()
    original = copy.deepcopy(dense)
    model = loraq.apply(dense, loraq.LoraConfig(r=4, alpha=8, quant="nf4"))
    with torch.no_grad():
        for _, layer in model.named_modules():
            if isinstance(layer, loraq.LoRALayer):
                layer.lora_B["default"].weight.normal_(0, 0.05)
    return model.eval(), original


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))


def test_merge_into_dequantized_is_exact_and_reported() -> None:
    model, _ = _qlora_model()
    expected = _logits(model, IDS)
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    want = layer.base_matrix() + layer.delta_matrix("default").detach()
    merged = loraq.unload(model, merge_into="dequantized", calibration=IDS)
    torch.testing.assert_close(merged.get_submodule(name).weight, want)
    torch.testing.assert_close(_logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    report = merged.loraq_merge_report
    assert report.into == "dequantized" and report.max_logit_diff < 1e-4 and report.kl < 1e-9
    assert "calibration batch (3, 12)" in report.format()


def test_dense_true_means_dequantized_and_reports_on_random_tokens() -> None:
    model, _ = _qlora_model()
    merged = loraq.unload(model, dense=True)
    report = merged.loraq_merge_report
    assert report.into == "dequantized" and report.max_logit_diff < 1e-4
    assert report.calibration == "4x32 random token ids"


def test_merge_into_original_uses_the_given_weights_and_measures_the_loss() -> None:
    model, original = _qlora_model()
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    want = original.get_submodule(name).weight + layer.delta_matrix("default").detach()
    merged = loraq.unload(model, merge_into="original", original=original, calibration=IDS)
    torch.testing.assert_close(merged.get_submodule(name).weight, want)
    # unadapted quantized layers take their original weights too
    report = merged.loraq_merge_report
    assert report.into == "original" and report.max_logit_diff > 1e-3 and report.kl > 0


def test_requantize_keeps_the_format_and_reports_the_rounding() -> None:
    model, _ = _qlora_model()
    merged = loraq.unload(model, merge_into="requantize", calibration=IDS)
    assert isinstance(merged.get_submodule("model.layers.0.self_attn.q_proj"), Linear4bit)
    report = merged.loraq_merge_report
    assert report.max_weight_change > 0 and report.kl > 0
    assert "re-quantization" in report.format()


def test_the_three_choices_rank_as_expected() -> None:
    kls = {}
    for into in MERGE_TARGETS:
        model, original = _qlora_model()
        given = original if into == "original" else None
        merged = loraq.unload(model, merge_into=into, original=given, calibration=IDS)
        kls[into] = merged.loraq_merge_report.kl
    assert kls["dequantized"] < 1e-9 < kls["requantize"]
    assert kls["dequantized"] < kls["original"]


def test_bad_merge_choices_name_the_argument() -> None:
    model, original = _qlora_model()
    with pytest.raises(ValueError, match=r"merge_into='original' needs original="):
        loraq.unload(model, merge_into="original")
    with pytest.raises(ValueError, match=r"merge_into='upcast' is invalid: expected one of"):
        loraq.unload(model, merge_into="upcast")
    with pytest.raises(ValueError, match="dense=True contradicts merge_into='requantize'"):
        loraq.unload(model, dense=True, merge_into="requantize")
    partial = {k: v for k, v in original.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(
        ValueError, match=r"original= has no tensor 'model.layers.1.mlp.up_proj.weight'"
    ):
        loraq.unload(copy.deepcopy(model), merge_into="original", original=partial)
    with pytest.raises(ValueError, match="export_merged: dtype='int4' is invalid"):
        loraq.export_merged(model, "unused", dtype="int4")
    with pytest.raises(ValueError, match=r"merge_into='original' needs original="):
        loraq.export_merged(model, "unused", merge_into="original")


def test_export_merged_writes_each_choice_with_its_report(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model, original = _qlora_model()
    expected = _logits(model, IDS)
    for into in MERGE_TARGETS:
        given = original if into == "original" else None
        loraq.export_merged(model, tmp_path / into, merge_into=into, original=given)
        report = json.loads((tmp_path / into / "merge_report.json").read_text())
        assert report["into"] == into
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    torch.testing.assert_close(_logits(dense, IDS), expected, rtol=1e-4, atol=1e-4)
    small = loraq.load_quantized(tmp_path / "requantize", LlamaForCausalLM)
    requantized = loraq.unload(copy.deepcopy(model), merge_into="requantize")
    torch.testing.assert_close(_logits(small, IDS), _logits(requantized, IDS))
    # the user's model is untouched
    torch.testing.assert_close(_logits(model, IDS), expected)


def test_gpt2_conv1d_merges_into_its_original_weights() -> None:
    torch.manual_seed(0)
    dense = tiny_gpt2()
    original = copy.deepcopy(dense)
    model = loraq.apply(dense, loraq.LoraConfig(r=4, alpha=8, quant="nf4"))
    name = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(name)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    delta = layer.delta_matrix("default").detach()  # (out, in), as the adapter sees it
    merged = loraq.unload(model, merge_into="original", original=original, calibration=IDS)
    conv = merged.get_submodule(name)
    assert type(conv).__name__ == "Conv1D"  # weight stored (in, out)
    torch.testing.assert_close(conv.weight, original.get_submodule(name).weight + delta.t())
    assert merged.loraq_merge_report.kl > 0


@pytest.mark.parametrize("quant", ["int8", "q4_0", "q8_0"])
def test_int8_and_gguf_bases_requantize_to_their_format(quant: str) -> None:
    torch.manual_seed(0)
    model = loraq.apply(tiny_llama(hidden=64), loraq.LoraConfig(r=4, alpha=8, quant=quant))
    with torch.no_grad():
        for _, layer in loraq.model.surgery.lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    kind = type(model.get_submodule("model.layers.0.mlp.up_proj").base_layer)
    expected = _logits(model, IDS)
    requantized = loraq.unload(copy.deepcopy(model), merge_into="requantize", calibration=IDS)
    assert type(requantized.get_submodule("model.layers.0.mlp.up_proj")) is kind
    assert 0 < requantized.loraq_merge_report.max_weight_change
    dense = loraq.unload(model, merge_into="dequantized", calibration=IDS)
    torch.testing.assert_close(_logits(dense, IDS), expected, rtol=1e-5, atol=1e-5)


def test_classifier_reports_kl_over_its_classes() -> None:
    torch.manual_seed(0)
    model = loraq.apply(tiny_bert_cls(), loraq.LoraConfig(r=4, quant="nf4"))
    with torch.no_grad():
        for _, layer in loraq.model.surgery.lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    merged = loraq.unload(model, merge_into="requantize")
    report = merged.loraq_merge_report
    assert report.calibration == "4x32 random token ids" and report.kl > 0


def test_bad_inputs_leave_the_model_unchanged() -> None:
    model, original = _qlora_model()
    before = _logits(model, IDS)
    bad = dict(original.state_dict())
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape"):
        loraq.unload(model, merge_into="original", original=bad)
    with pytest.raises(ValueError, match=r"original= is only used with merge_into='original'"):
        loraq.unload(model, merge_into="requantize", original=original)
    with pytest.raises(ValueError, match="merge_into needs merge_adapters=True"):
        loraq.unload(model, merge_adapters=False, merge_into="dequantized")
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), loraq.LoRALayer)
    torch.testing.assert_close(_logits(model, IDS), before)
    plain = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4))
    with pytest.raises(ValueError, match="merge_into='requantize' needs a quantized base"):
        loraq.unload(plain, merge_into="requantize")


def test_unload_without_a_merge_choice_keeps_its_old_behaviour() -> None:
    model, _ = _qlora_model()
    merged = loraq.unload(copy.deepcopy(model))  # re-quantizes, no report
    assert isinstance(merged.get_submodule("model.layers.0.self_attn.q_proj"), Linear4bit)
    assert not hasattr(merged, "loraq_merge_report")
    bare = loraq.unload(model, merge_adapters=False, dense=True)
    assert isinstance(bare.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)
    assert not hasattr(bare, "loraq_merge_report")


# ---------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    llama = make_tiny_llama(tmp / "llama")
    data = write_pattern_jsonl(tmp / "pattern.jsonl", n=8)
    config = write_config(
        tmp / "config.yaml",
        {
            "model": {"path": str(llama), "task": "causal-lm"},
            "data": {"train": str(data), "eval": str(data), "max_length": 32},
            "lora": {"r": 8, "alpha": 16, "quant": "nf4", "compute_dtype": "float32"},
            "training": {"batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "progress": False},
        },
    )
    out = tmp / "run"
    assert cli.main(["train", str(config), "--max_steps", "8", "--output_dir", str(out)]) == 0
    return out / "adapter"


@pytest.mark.parametrize("into", MERGE_TARGETS)
def test_cli_merge_into(qlora_run, tmp_path, capsys, into) -> None:
    out = tmp_path / "merged"
    code = cli.main(["merge", "--adapter", str(qlora_run), "--out", str(out), "--into", into])
    assert code == 0, capsys.readouterr().err
    line = capsys.readouterr().out
    assert f"merged into {into}, max |Δlogit|" in line and "KL" in line
    assert "on calibration batch (8, " in line  # the run's eval records, not random ids
    assert json.loads((out / "merge_report.json").read_text())["into"] == into


def test_cli_merge_original_flag_needs_into_original(qlora_run, tmp_path, capsys) -> None:
    args = ["merge", "--adapter", str(qlora_run), "--out", str(tmp_path / "m")]
    assert cli.main([*args, "--original", str(tmp_path)]) == 2
    assert "--original is only used with --into original" in capsys.readouterr().err


def test_cli_merge_into_original_reads_the_float_base(qlora_run, tmp_path, capsys) -> None:
    base = ["merge", "--adapter", str(qlora_run)]
    out = tmp_path / "merged"
    assert cli.main([*base, "--out", str(out), "--into", "original"]) == 0
    assert "merged into original" in capsys.readouterr().out
    # a quantized folder is not the float weights: refused, naming the folder
    quantized = tmp_path / "q"
    assert cli.main([*base, "--out", str(quantized), "--into", "requantize"]) == 0
    capsys.readouterr()
    bad = [*base, "--out", str(tmp_path / "m2"), "--into", "original", "--original", str(quantized)]
    assert cli.main(bad) == 2
    assert f"{quantized}: that model is stored quantized" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
