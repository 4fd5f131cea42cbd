"""``compute_dtype`` in training: ``auto`` is the default and bf16 autocast tracks float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import pattern_config
from loraq import LoraConfig
from loraq.core.precision import resolve_compute_dtype
from loraq.model.quantize import quantize_model
from loraq.train.config import load_config
from loraq.train.loop import train
from test_train_loop import QUIET, llama_config


@pytest.fixture(scope="module")
def llama(llama_dir) -> Path:
    return llama_dir


def test_config_accepts_auto_and_names_it_in_errors() -> None:
    assert LoraConfig(compute_dtype="auto").compute_dtype == "auto"
    with pytest.raises(ValueError, match=r"compute_dtype='half'.*'auto'"):
        LoraConfig(compute_dtype="half")


def test_quantized_base_resolves_auto_for_its_device() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    quantize_model(model, LoraConfig(quant="nf4", compute_dtype="auto"))
    assert model[0].compute_dtype == resolve_compute_dtype("auto", "cpu")


def test_train_defaults_to_auto_and_records_it(tmp_path, llama) -> None:
    logs: list[str] = []
    lora = {"r": 8, "alpha": 16}  # no compute_dtype: the run's default applies
    path = pattern_config(tmp_path, llama, lora, compute_dtype=None, max_steps=2, eval_every=None)
    train(load_config(path, {"lora.quant": "nf4"}), log=logs.append)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lora"]["compute_dtype"] == "auto"
    resolved = str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch.")
    assert any(f"{resolved} compute" in line for line in logs), logs


def test_bf16_autocast_training_tracks_float32(tmp_path, llama) -> None:
    """Same seed and data: the bf16 loss curve stays within rounding noise of float32's."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        run = tmp_path / dtype
        run.mkdir()
        path = llama_config(run, llama, max_steps=12, eval_every=None)
        overrides = {"lora.quant": "nf4", "lora.compute_dtype": dtype}
        curves[dtype] = train(load_config(path, overrides), **QUIET).losses
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert bf16[-1] < 0.5 * bf16[0], bf16  # it learns
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert abs(a - b) <= 0.05 * abs(a) + 0.05, (step, fp32, bf16)
