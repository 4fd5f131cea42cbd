"""inspect_path / `loraq inspect`: facts about adapter folders and 4-bit checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loraq
from conftest import tiny_llama
from loraq.cli import main
from loraq.io import FormatError, save_adapter
from loraq.io.inspect import format_inspection, inspect_path
from loraq.quant import quantize_4bit


def _adapter(tmp_path: Path) -> Path:
    model = loraq.apply(
        tiny_llama(),
        loraq.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    loraq.apply(model, loraq.LoraConfig(r=2, alpha=2, targets=["o_proj"], use_dora=True), "extra")
    return save_adapter(model, tmp_path / "adapter")


def test_inspect_adapter_folder(tmp_path: Path) -> None:
    info = inspect_path(_adapter(tmp_path))
    assert info["kind"] == "adapter"
    default, extra = info["adapters"]
    assert (default["name"], default["r"], default["lora_alpha"], default["scaling"]) == (
        "default",
        4,
        8,
        2.0,
    )
    assert default["target_modules"] == ["q_proj", "v_proj"]
    assert default["adapted_modules"] == 4  # q and v in two layers
    # q: A (4,32) + B (32,4); v: A (4,32) + B (16,4) per layer; lm_head (64,32) saved whole.
    assert default["lora_params"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert default["params"] == default["lora_params"] + 64 * 32
    assert default["loadable"] and default["task_type"] == "CAUSAL_LM"
    assert extra["name"] == "extra" and extra["use_dora"] and extra["r"] == 2
    text = format_inspection(info)
    assert "2 LoRA adapter(s)" in text and "rank 4, alpha 8, scaling 2" in text and "DoRA" in text


def test_inspect_flags_unloadable_adapter(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    info = inspect_path(folder)["adapters"][0]
    assert not info["loadable"] and "rank_pattern" in info["problem"]
    assert "cannot be loaded by loraq" in format_inspection(inspect_path(folder))


def test_inspect_4bit_checkpoint(tmp_path: Path) -> None:
    weight = torch.randn(128, 256)
    q = quantize_4bit(weight, blocksize=64, quant_type="nf4", double_quant=True)
    tensors = {**q.to_state_dict("layer.proj."), "norm.weight": torch.ones(256)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "toy",
                "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
            }
        )
    )
    info = inspect_path(tmp_path)
    assert info["kind"] == "quantized"
    (layer,) = info["quantized_layers"]
    assert layer["name"] == "layer.proj" and layer["quant_type"] == "nf4" and layer["double_quant"]
    assert layer["shape"] == [128, 256] and layer["params"] == 128 * 256
    assert layer["bits_per_param"] == 8 * (128 * 256 // 2 + 512 + 2 * 4) / (128 * 256)  # ~4.127
    assert info["dense_params"] == 256
    text = format_inspection(info)
    assert "1 quantized layers: nf4, blocksize 64, double quantization" in text


def test_inspect_refuses_pickles_and_missing(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError, match="pickle file"):
        inspect_path(tmp_path)
    with pytest.raises(FormatError, match="pickle file"):
        inspect_path(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError):
        inspect_path(tmp_path / "missing")


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _adapter(tmp_path)
    assert main(["inspect", str(folder)]) == 0
    assert "rank 4, alpha 8" in capsys.readouterr().out
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapters"][0]["r"] == 4
    (folder / "adapter_model.safetensors").write_bytes(b"broken")
    assert main(["inspect", str(folder)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
