"""Bad input never hangs, never gives a silently wrong result, and the error names the culprit."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loraq
from conftest import tiny_llama
from loraq.core.patterns import unsafe_regex_reason
from loraq.io import FormatError, load_adapter, save_adapter
from loraq.train.config import ConfigError, from_dict
from loraq.train.data import infer_labels, load_datasets, micro_batches, read_records
from test_train_support import char_tokenizer

PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------- floats
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["alpha", "dropout"])
def test_lora_config_floats_must_be_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}={value!r}"):
        loraq.LoraConfig(**{field: value})


def _train_cfg(**training) -> dict:
    return {
        "model": {"path": "m", "task": "causal-lm"},
        "data": {"train": "t.jsonl"},
        "training": training,
    }


@pytest.mark.parametrize("key", ["lr", "weight_decay", "max_grad_norm", "warmup_ratio"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_training_floats_must_be_finite_and_named(key: str, value: str) -> None:
    import yaml

    parsed = yaml.safe_load(value)
    with pytest.raises(ConfigError, match=rf"training\.{key} must be a finite number"):
        from_dict(_train_cfg(**{key: parsed}))


def test_lora_alpha_nan_in_train_config_names_lora_alpha() -> None:
    raw = _train_cfg()
    raw["lora"] = {"alpha": math.nan}
    with pytest.raises(ConfigError, match=r"lora: LoraConfig\.alpha=nan"):
        from_dict(raw)


# ---------------------------------------------------------------------------------- data
def test_tsv_is_read_without_quote_processing(tmp_path: Path) -> None:
    rows = [f'"quoted start {i}\t{"pos" if i % 2 else "neg"}' for i in range(20)]
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    records = read_records(path)
    assert len(records) == 20
    assert records[0] == {"text": '"quoted start 0', "label": "neg"}


@pytest.mark.parametrize(
    "body, message",
    [
        ("a\tpos\nno label here\n", r"line 3: row has 1 field\(s\), the header has 2"),
        ("a\tpos\nb\tneg\textra\n", r"line 3: row has 3 field\(s\), the header has 2"),
    ],
)
def test_tsv_row_with_missing_or_extra_field_names_the_line(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n" + body, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_records(path)


def test_csv_row_with_extra_field_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a, b",pos\nc,neg,oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d.csv' line 3: row has 3 field"):
        read_records(path)


def test_null_or_empty_label_is_an_error_not_a_class(tmp_path: Path) -> None:
    records = [{"text": "a", "label": "pos"}, {"text": "b", "label": None}]
    with pytest.raises(ConfigError, match=r"row 2 has no label"):
        infer_labels(records, "label", "train.jsonl")
    records[1]["label"] = "  "
    with pytest.raises(ConfigError, match=r"row 2 has no label"):
        infer_labels(records, "label", "train.jsonl")


def _cfg(train: Path, **data) -> object:
    return from_dict(
        {
            "model": {"path": "m", "task": data.pop("task", "causal-lm")},
            "data": {"train": str(train), **data},
        }
    )


def test_eval_split_that_takes_every_record_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data.eval_split=0.2 holds out all 1 record"):
        load_datasets(_cfg(path, eval_split=0.2), char_tokenizer())


def test_null_label_in_jsonl_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    lines = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    lines.append({"text": "?", "label": None})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"row 3 has no label"):
        load_datasets(_cfg(path, task="seq-cls"), char_tokenizer())
    # With the label names given, the per-example check names the row too.
    with pytest.raises(ConfigError, match=r"row 3 has no label"):
        load_datasets(_cfg(path, task="seq-cls", labels=["neg", "pos"]), char_tokenizer())


def test_empty_batch_stream_raises_instead_of_spinning() -> None:
    with pytest.raises(ValueError, match="never yield"):
        next(micro_batches([], 4, seed=0, pad_id=0))


# ---------------------------------------------------------------------------------- regexes
@pytest.mark.parametrize("pattern", ["(.+)+X", "(a|aa)*b", r"(\w+)\1", ".*.*.*.*X", "x" * 1001])
def test_unsafe_regexes_are_refused(pattern: str) -> None:
    assert unsafe_regex_reason(pattern) is not None
    with pytest.raises(ValueError, match=r"LoraConfig\.targets=.*bounded time"):
        loraq.LoraConfig(targets=pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        r"^(?!.*vision).*\.(q_proj|v_proj)$",
        r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
        r".*layers\.(1[0-9]|2[0-3])\..*(q|v)_proj",
    ],
)
def test_usual_module_regexes_are_accepted(pattern: str) -> None:
    assert unsafe_regex_reason(pattern) is None


def _saved(tmp_path: Path, **config) -> Path:
    model = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, alpha=8, targets=["q_proj"], **config))
    return save_adapter(model, tmp_path / "adapter")


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_catastrophic_regex_in_adapter_config_is_refused_fast(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, target_modules="(.+)+X")
    start = time.monotonic()
    with pytest.raises(FormatError, match=r"field 'target_modules'.*bounded time"):
        load_adapter(tiny_llama(), folder)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------- shapes
def test_huge_rank_is_checked_against_the_file_before_allocating(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, r=10**9)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(FormatError, match=rf"'{key}' has shape \(4, 32\) but the model expects"):
        load_adapter(model, folder)
    assert loraq.adapter_names(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_huge_rank_with_no_tensors_is_refused_before_allocating(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, r=10**9)
    _rewrite_weights(folder, lambda t: [t.pop(k) for k in list(t)] and t.update(x=torch.ones(1)))
    with pytest.raises(FormatError, match=r"missing keys"):
        load_adapter(tiny_llama(), folder)


def test_rank_above_layer_size_needs_an_explicit_choice() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"LoraConfig\.r=6 .*'0'.*min\(in, out\) = 4"):
        loraq.apply(model, loraq.LoraConfig(r=6, targets=["0"]))
    assert type(model[0]) is nn.Linear
    loraq.apply(model, loraq.LoraConfig(r=6, targets=["0"]), allow_large_rank=True)
    assert model[0].lora_A["default"].weight.shape == (6, 8)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_adapter_tensor_names_the_tensor(tmp_path: Path, bad: float) -> None:
    folder = _saved(tmp_path)
    key = PREFIX + "model.layers.1.self_attn.q_proj.lora_B.weight"

    def edit(t: dict) -> None:
        t[key][0, 0] = bad

    _rewrite_weights(folder, edit)
    with pytest.raises(FormatError, match=rf"tensor '{key}' holds NaN or Inf"):
        load_adapter(tiny_llama(), folder)


# ---------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantized_layers_refuse_integer_input(quant: str) -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randint(0, 3, (2, 64))
    with pytest.raises(RuntimeError):
        model(x)  # what a dense layer does
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["0"], quant=quant))
    with pytest.raises(TypeError, match="floating-point input"):
        model(x)
    with pytest.raises(TypeError, match="floating-point input"):
        model[0].base_layer(x)


def test_backward_after_merge_says_to_unmerge() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["0"]))
    x = torch.randn(3, 16)
    loraq.merge(model)
    with torch.no_grad():
        model(x)  # inference after merge is fine
    with pytest.raises(RuntimeError, match=r"merged into the base.*loraq\.unmerge"):
        model(x).sum().backward()
    loraq.unmerge(model)
    model(x).sum().backward()
    assert model[0].lora_B["default"].weight.grad is not None


def test_set_adapter_after_merge_unmerges_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    for name in ("a", "b"):
        loraq.apply(model, loraq.LoraConfig(r=4, targets=["0"]), adapter_name=name)
    with torch.no_grad():
        for name in ("a", "b"):
            model[0].lora_B[name].weight.normal_()
    x = torch.randn(3, 16)
    loraq.set_adapter(model, "b")
    expected_b = model(x).detach()
    loraq.set_adapter(model, "a")
    loraq.merge(model)
    with pytest.warns(UserWarning, match=r"unmerging adapter\(s\) \['a'\]"):
        loraq.set_adapter(model, "b")
    assert loraq.active_adapter(model) == "b"
    torch.testing.assert_close(model(x).detach(), expected_b)


# ---------------------------------------------------------------------------------- checkpoints
def test_load_quantized_with_a_wrong_architectures_entry(tmp_path: Path) -> None:
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"], quant="nf4"))
    folder = loraq.save_quantized(model, tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    for archs, message in [
        (["BertForSequenceClassification"], r"names BertForSequenceClassification, which needs"),
        (["logging"], r"field 'architectures' \(\['logging'\]\) names no transformers model"),
        ("LlamaForCausalLM", r"field 'architectures'"),
    ]:
        config["architectures"] = archs
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(FormatError, match=message):
            loraq.load_quantized(folder)


@pytest.mark.parametrize("part", ["nested_absmax", "quant_map", "nested_quant_map"])
def test_nan_in_quantization_state_names_the_tensor(tmp_path: Path, part: str) -> None:
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"], quant="nf4"))
    folder = loraq.save_quantized(model, tmp_path / "q")
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    key = f"model.layers.0.mlp.up_proj.weight.{part}"
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=rf"tensor '{key}' holds NaN or Inf"):
        loraq.load_quantized(folder)
