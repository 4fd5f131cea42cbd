"""A call that raises leaves the model exactly as it was: same modules, tensors and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loraq
from conftest import tiny_gpt2, tiny_llama
from loraq.io import FormatError
from loraq.layers.lora import LoRALayer

PREFIX = "base_model.model."


def fingerprint(model: nn.Module) -> dict:
    """Everything a failed call must not change."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": loraq.adapter_names(model),
        "active": loraq.active_adapter(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["types"] == before["types"]
    assert list(after["tensors"]) == list(before["tensors"])
    for key, value in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True)
    assert after["flags"] == before["flags"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]


def test_apply_with_quant_and_bad_modules_to_save_changes_nothing() -> None:
    model = tiny_llama()
    before = fingerprint(model)
    bad = loraq.LoraConfig(r=4, targets=["q_proj"], quant="nf4", modules_to_save=["nope"])
    with pytest.raises(ValueError, match="modules_to_save entry 'nope' matches no module"):
        loraq.apply(model, bad)
    assert_unchanged(model, before)
    # The corrected retry works on the untouched model.
    loraq.apply(model, bad.replace(modules_to_save=["lm_head"]))
    assert loraq.adapter_names(model) == ["default"]


def test_nan_weight_is_found_before_quantizing_and_named() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*NaN"):
        loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"], quant="nf4"))
    assert_unchanged(model, before)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_failure_half_way_through_apply_is_rolled_back(
    monkeypatch: pytest.MonkeyPatch, init: str, quant: str | None
) -> None:
    """A fault after some layers are wrapped (and PiSSA rewrote their weights) is undone."""
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["v_proj"]), adapter_name="first")
    before = fingerprint(model)
    calls = {"n": 0}
    original = LoRALayer.add_adapter

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated allocation failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRALayer, "add_adapter", flaky)
    config = loraq.LoraConfig(r=4, targets=["q_proj", "v_proj", "up_proj"], init=init, quant=quant)
    with pytest.raises(MemoryError):
        loraq.apply(model, config, adapter_name="second")
    assert calls["n"] == 3
    assert_unchanged(model, before)


def test_gpt2_conv1d_rollback_restores_conv1d() -> None:
    model = tiny_gpt2()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        loraq.apply(
            model, loraq.LoraConfig(r=4, targets=["c_attn"], quant="nf4", modules_to_save=["x"])
        )
    assert_unchanged(model, before)


def _saved_adapter(tmp_path: Path, **config) -> Path:
    model = loraq.apply(
        tiny_llama(), loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], **config)
    )
    return loraq.save_adapter(model, tmp_path / "adapter")


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_load_adapter_with_quant_that_fails_late_changes_nothing(tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path)
    _rewrite(folder, lambda t: t.__setitem__(PREFIX + "model.norm.lora_A.weight", torch.ones(1)))
    model = tiny_llama()
    loraq.apply(model, loraq.LoraConfig(r=2, targets=["o_proj"]), adapter_name="kept")
    before = fingerprint(model)
    with pytest.raises(FormatError, match="unexpected keys"):
        loraq.load_adapter(model, folder, adapter_name="new", quant="nf4")
    assert_unchanged(model, before)
    # save_pretrained-style keys are those of the plain model (no stray base_layer segments).
    assert not any(".q_proj.base_layer" in k for k in model.state_dict())


def test_load_adapter_with_bad_modules_to_save_tensor_changes_nothing(tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path, modules_to_save=["lm_head"])
    _rewrite(folder, lambda t: t.__setitem__(PREFIX + "lm_head.weight", torch.zeros(3, 3)))
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(FormatError, match=r"lm_head.weight' has shape \(3, 3\)"):
        loraq.load_adapter(model, folder)
    assert_unchanged(model, before)
    assert type(model.lm_head) is nn.Linear


def test_load_adapter_with_unknown_target_changes_nothing(tmp_path: Path) -> None:
    folder = _saved_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "no_such_module"]
    config["modules_to_save"] = ["embed_tokens", "nothing_here"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    before = fingerprint(model)
    # "nothing_here" is dropped as PEFT does for absent saved modules; embed_tokens has no tensor.
    with pytest.raises(FormatError, match="missing keys"):
        loraq.load_adapter(model, folder, quant="int8")
    assert_unchanged(model, before)


def test_quantize_model_nan_changes_nothing() -> None:
    from loraq.model.quantize import quantize_model

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("inf")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        quantize_model(model, loraq.LoraConfig(targets=["q_proj"], quant="fp4"))
    assert_unchanged(model, before)
