"""Adapter files against real PEFT (0.22 layout), both directions: same logits, same keys, same config."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import loraq
from conftest import ReferenceLibrary, tiny_bert_cls, tiny_gpt2, tiny_llama
from loraq.io import load_adapter, save_adapter
from loraq.io.peft_config import PEFT_LORA_DEFAULTS

# Tests that compare with PEFT skip on their own when it is missing.
peft = ReferenceLibrary("peft")

TOL = 1e-5
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _randomize(model: nn.Module, std: float = 0.1) -> None:
    """Perturb every trainable tensor (A, B, magnitudes, saved modules, biases): B becomes
    non-zero, so a file that lost or mis-mapped any tensor changes the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def _peft_load(base: nn.Module, path: Path, adapter_name: str = "default") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path), adapter_name=adapter_name)


# (base model factory, loraq config kwargs, peft config kwargs)
CASES: dict[str, tuple[Callable[[], nn.Module], dict, dict]] = {
    "lora": (
        tiny_llama,
        {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]},
        {
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
        },
    ),
    "rslora-all-linear": (
        tiny_llama,
        {"r": 4, "alpha": 6, "targets": "all-linear", "use_rslora": True},
        {"r": 4, "lora_alpha": 6, "target_modules": "all-linear", "use_rslora": True},
    ),
    "dora-regex": (
        tiny_llama,
        {"r": 2, "alpha": 4, "targets": r".*\.(q_proj|o_proj|gate_proj)", "use_dora": True},
        {
            "r": 2,
            "lora_alpha": 4,
            "target_modules": r".*\.(q_proj|o_proj|gate_proj)",
            "use_dora": True,
        },
    ),
    "gpt2-conv1d": (
        tiny_gpt2,
        {"r": 4, "alpha": 8, "targets": ["c_attn", "c_proj", "c_fc"]},
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
            "fan_in_fan_out": True,
        },
    ),
    "gpt2-dora": (
        tiny_gpt2,
        {"r": 2, "alpha": 2, "targets": "all-linear", "use_dora": True},
        {"r": 2, "lora_alpha": 2, "target_modules": "all-linear", "use_dora": True},
    ),
    "embedding": (
        tiny_llama,
        {"r": 4, "alpha": 8, "targets": ["embed_tokens", "q_proj"]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
    ),
    "modules-to-save": (
        tiny_llama,
        {
            "r": 4,
            "alpha": 8,
            "targets": ["v_proj"],
            "modules_to_save": ["lm_head"],
            "exclude": ["layers.1.self_attn.v_proj"],
        },
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["v_proj"],
            "modules_to_save": ["lm_head"],
            "exclude_modules": ["layers.1.self_attn.v_proj"],
        },
    ),
    "seq-cls-bias-all": (
        tiny_bert_cls,
        {
            "r": 4,
            "alpha": 8,
            "targets": ["query", "value"],
            "modules_to_save": ["classifier"],
            "bias": "all",
        },
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "value"],
            "task_type": "SEQ_CLS",
            "bias": "all",
        },
    ),
    "bias-lora-only-gaussian": (
        tiny_bert_cls,
        {
            "r": 4,
            "alpha": 8,
            "targets": ["query", "dense"],
            "bias": "lora_only",
            "init": "gaussian",
            "modules_to_save": ["classifier"],
        },
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "dense"],
            "bias": "lora_only",
            "init_lora_weights": "gaussian",
            "modules_to_save": ["classifier"],
        },
    ),
    "pissa": (
        tiny_llama,
        {"r": 2, "alpha": 4, "targets": ["q_proj", "up_proj"], "init": "pissa"},
        {
            "r": 2,
            "lora_alpha": 4,
            "target_modules": ["q_proj", "up_proj"],
            "init_lora_weights": "pissa",
        },
    ),
}

# PiSSA's SVD init runs on both sides; it is the slowest case and covered by `-m slow`.
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if c == "pissa" else c for c in CASES]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_loraq_saves_peft_loads_same_logits(case: str, tmp_path: Path) -> None:
    factory, ours_kw, _ = CASES[case]
    base = factory()
    ours = loraq.apply(copy.deepcopy(base), loraq.LoraConfig(**ours_kw))
    _randomize(ours)
    expected = _logits(ours)
    save_adapter(ours, tmp_path)
    theirs = _peft_load(copy.deepcopy(base), tmp_path)
    assert (_logits(theirs) - expected).abs().max() < TOL
    assert not torch.equal(expected, _logits(base)), "the adapter must change the output"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_peft_saves_loraq_loads_same_logits(case: str, tmp_path: Path) -> None:
    factory, _, peft_kw = CASES[case]
    base = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kw))
        _randomize(theirs)
        theirs.save_pretrained(str(tmp_path))
    expected = _logits(theirs)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert (_logits(ours) - expected).abs().max() < TOL
    assert not torch.equal(expected, _logits(base))


def test_files_match_peft_layout(tmp_path: Path) -> None:
    """Same file names, metadata, keys, dtypes, shapes and config keys as PEFT's own save."""
    base = tiny_llama()
    kw = CASES["modules-to-save"]
    ours = loraq.apply(copy.deepcopy(base), loraq.LoraConfig(**kw[1], use_dora=True))
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw[2], use_dora=True))
        theirs.save_pretrained(str(tmp_path / "theirs"))

    def layout(folder: Path) -> tuple[dict, dict]:
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            keys = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
            return keys, f.metadata()

    assert layout(tmp_path / "ours") == layout(tmp_path / "theirs")
    text = (tmp_path / "ours" / "adapter_config.json").read_text()
    ours_cfg = json.loads(text)
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert text == json.dumps(ours_cfg, indent=2, sort_keys=True) + "\n"
    assert set(ours_cfg) == set(theirs_cfg) == set(PEFT_LORA_DEFAULTS)
    theirs_cfg["target_modules"] = sorted(theirs_cfg["target_modules"])  # PEFT's set order
    ours_cfg["target_modules"] = sorted(ours_cfg["target_modules"])
    # PEFT records the wrapper class only when no task_type is given; we infer CAUSAL_LM.
    assert ours_cfg.pop("task_type") == "CAUSAL_LM"
    theirs_cfg.pop("task_type"), theirs_cfg.pop("auto_mapping"), ours_cfg.pop("auto_mapping")
    assert ours_cfg == theirs_cfg
    assert (tmp_path / "ours" / "README.md").is_file()


def test_all_linear_is_expanded_like_peft(tmp_path: Path) -> None:
    base = tiny_bert_cls()
    ours = loraq.apply(copy.deepcopy(base), loraq.LoraConfig(targets="all-linear"))
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS")
        )
        theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours_cfg["target_modules"] == sorted(theirs_cfg["target_modules"])
    assert ours_cfg["task_type"] == "SEQ_CLS"


def test_gpt2_sets_fan_in_fan_out_and_task_types() -> None:
    from loraq.io.peft_config import infer_task_type

    ours = loraq.apply(tiny_gpt2(), loraq.LoraConfig(targets=["c_attn"]))
    from loraq.io.peft_config import peft_config_dict

    data = peft_config_dict(ours, "default", loraq.config_of(ours))
    assert data["fan_in_fan_out"] is True and data["task_type"] == "CAUSAL_LM"
    from transformers import BertConfig, BertModel

    assert (
        infer_task_type(
            BertModel(
                BertConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
                )
            )
        )
        == "FEATURE_EXTRACTION"
    )
    custom = nn.Sequential(nn.Linear(4, 4))
    assert infer_task_type(custom) is None


def test_several_adapters_use_peft_subfolders(tmp_path: Path) -> None:
    base = tiny_llama()
    ours = copy.deepcopy(base)
    loraq.apply(ours, loraq.LoraConfig(r=4, targets=["q_proj"]))
    loraq.apply(ours, loraq.LoraConfig(r=2, alpha=3, targets=["v_proj", "o_proj"]), "second")
    _randomize(ours)  # the active adapter ("second")
    loraq.set_adapter(ours, "default")
    _randomize(ours)
    expected_default = _logits(ours)
    loraq.set_adapter(ours, "second")
    expected_second = _logits(ours)

    save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()

    theirs = _peft_load(copy.deepcopy(base), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert (_logits(theirs) - expected_default).abs().max() < TOL
    theirs.set_adapter("second")
    assert (_logits(theirs) - expected_second).abs().max() < TOL

    # Back into loraq: a plain model, then a second adapter found in PEFT's sub-folder.
    again = load_adapter(copy.deepcopy(base), tmp_path)
    assert (_logits(again) - expected_default).abs().max() < TOL
    load_adapter(again, tmp_path, adapter_name="second")
    assert loraq.adapter_names(again) == ["default", "second"]
    assert (_logits(again) - expected_second).abs().max() < TOL


def test_single_named_adapter_goes_to_root(tmp_path: Path) -> None:
    ours = loraq.apply(tiny_llama(), loraq.LoraConfig(targets=["q_proj"]), "mine")
    loraq.apply(ours, loraq.LoraConfig(targets=["k_proj"]), "other")
    save_adapter(ours, tmp_path / "one", adapter_name="other")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj"
    ]
    save_adapter(ours, tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").is_file()  # first adapter at the root
    assert (tmp_path / "all" / "other" / "adapter_config.json").is_file()


def test_roundtrip_keeps_config_and_file_info(tmp_path: Path) -> None:
    """loraq -> file -> loraq -> file gives the same bytes (config and tensors)."""
    base = tiny_llama()
    ours = loraq.apply(copy.deepcopy(base), loraq.LoraConfig(**CASES["embedding"][1]))
    _randomize(ours)
    save_adapter(ours, tmp_path / "a")
    again = load_adapter(copy.deepcopy(base), tmp_path / "a")
    save_adapter(again, tmp_path / "b")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (_logits(again) - _logits(ours)).abs().max() == 0
