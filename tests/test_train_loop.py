"""loraq.train.loop on tiny random models: learning, outputs, exact resume, Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import pattern_config, sentiment_config
from loraq.generation.decode import generate
from loraq.generation.sampling import sample_next
from loraq.train import checkpoint as ckpt
from loraq.train.config import ConfigError, load_config
from loraq.train.inference import load_trained
from loraq.train.loop import train
from loraq.train.metrics import read_metrics
from loraq.train.optim import lr_factor

QUIET = {"log": lambda s: None}


@pytest.fixture(scope="module")
def llama(llama_dir) -> Path:
    return llama_dir


@pytest.fixture(scope="module")
def bert(bert_dir) -> Path:
    return bert_dir


def llama_config(tmp_path: Path, llama: Path, **training) -> Path:
    lora = {"r": 8, "alpha": 16, "dropout": 0.1}
    return pattern_config(tmp_path, llama, lora, **{"max_steps": 30, "num_threads": 1, **training})


def test_lr_schedule_shapes():
    assert [round(lr_factor(s, 10, 2, "cosine"), 3) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, 2, "cosine") < 0.05
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits).item() == 1
    gen = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, top_k=1, generator=gen).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=gen).item() == 1 for _ in range(20))
    picks = {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(100)}
    assert picks == {1, 3}
    draws = [
        sample_next(logits, 2.0, generator=torch.Generator().manual_seed(5)).item()
        for _ in range(3)
    ]
    assert len(set(draws)) == 1  # same seed, same draw


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_causal_lm_learns_pattern_and_generates_it(tmp_path, llama, quant):
    path = llama_config(tmp_path, llama, max_steps=40)
    result = train(load_config(path, {"lora.quant": quant}), **QUIET)
    assert result.losses[0] > 3.0
    assert result.losses[-1] < 0.05, result.losses[-5:]
    assert result.eval_after["eval_loss"] < 0.05
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "loraq_train.yaml").is_file()
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert {"lr", "tokens_per_s", "epoch"} <= set(records[1])
    assert 0 < result.trainable_params < result.total_params

    model, tok, cfg = load_trained(adapter=run / "adapter")
    assert cfg.model.task == "causal-lm"
    assert generate(model, tok, ["abc:"], max_new_tokens=12) == ["xyzxyz"]
    sampled = [
        generate(model, tok, ["abc:"], max_new_tokens=12, temperature=0.7, top_p=0.9, seed=s)
        for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]


def test_packing_and_grad_accum_run(tmp_path, llama):
    cfg = load_config(
        llama_config(tmp_path, llama, max_steps=4, grad_accum=2, eval_before=False),
        ["--packing", "--max_length", "24", "--gradient_checkpointing"],
    )
    result = train(cfg, **QUIET)
    assert result.steps == 4 and all(math.isfinite(x) for x in result.losses)
    assert not result.eval_before and "eval_perplexity" in result.eval_after


def losses_by_step(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, llama):
    """The per-step losses of an uninterrupted 12-step run (dropout on, 2 epochs of data)."""
    tmp = tmp_path_factory.mktemp("reference")
    train(load_config(llama_config(tmp, llama, max_steps=12, eval_every=5)), **QUIET)
    return losses_by_step(tmp / "run")


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, llama, reference_losses):
    path = llama_config(tmp_path, llama, max_steps=12, eval_every=5, save_every=5)

    def crash(step, loss):
        if step == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(path), on_step=crash, **QUIET)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-000005"
    ]
    resumed = train(load_config(path, ["--resume"]), **QUIET)
    assert resumed.steps == 12 and len(resumed.losses) == 7
    got = losses_by_step(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))  # lines 6-7 of the crashed run were replaced
    for step, loss in reference_losses.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step


def test_sigint_checkpoints_and_resume_matches(tmp_path, llama, reference_losses):
    path = llama_config(tmp_path, llama, max_steps=12, eval_every=5)

    def press_ctrl_c(step, loss):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(load_config(path), on_step=press_ctrl_c, **QUIET)
    assert first.interrupted and first.steps == 4
    assert first.checkpoint.name == "step-000004"
    state = json.loads((first.checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["epoch"] == 0 and state["batch_in_epoch"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    second = train(load_config(path, ["--resume", str(first.checkpoint)]), **QUIET)
    assert not second.interrupted and second.steps == 12
    got = losses_by_step(tmp_path / "run")
    for step, loss in reference_losses.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step


def test_sigint_in_a_subprocess_exits_cleanly(tmp_path, llama):
    path = llama_config(tmp_path, llama, max_steps=100000, eval_before=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraq.cli", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "continue with --resume" in out
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_checkpoint_files_atomic_and_pruned(tmp_path, llama):
    path = llama_config(tmp_path, llama, max_steps=6, save_every=2, keep_checkpoints=2)
    train(load_config(path, ["--eval", "null"]), **QUIET)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000006"]
    latest = ckpt.latest_checkpoint(folder)
    assert {p.name for p in latest.iterdir()} == {
        "trainable.safetensors",
        "resume_state.json",
        "resume_state.safetensors",
        "state.json",
    }
    for file in latest.iterdir():  # no pickle anywhere: JSON or safetensors only
        assert file.suffix in (".json", ".safetensors"), file
    (folder / ".tmp-step-000008-1").mkdir()  # a half-written one is never picked
    assert ckpt.latest_checkpoint(folder) == latest
    # A checkpoint from another LoRA rank does not fit: a clear error, not silent garbage.
    with pytest.raises(
        ValueError, match=r"does not fit this model: .*lora_A.default.weight' has shape \(8, 96\)"
    ):
        train(load_config(path, ["--resume", "--r", "4", "--eval", "null"]), **QUIET)


def test_seq_cls_head_trains_and_accuracy_rises(tmp_path, bert):
    path = sentiment_config(tmp_path, bert, max_steps=30, num_threads=1)
    result = train(load_config(path), **QUIET)
    assert result.eval_after["eval_accuracy"] >= 0.95 > result.eval_before["eval_accuracy"]
    assert result.best_metric == result.eval_after["eval_accuracy"]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["lora"]["modules_to_save"] == ["classifier"]  # added automatically
    assert resolved["data"]["labels"] == ["neg", "pos"]
    model, _, _ = load_trained(adapter=tmp_path / "run" / "adapter")
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_full_finetuning_method(tmp_path, llama):
    path = llama_config(tmp_path, llama, max_steps=3, method="full", eval_before=False)
    result = train(load_config(path), **QUIET)
    assert result.trainable_params == result.total_params
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    model, tok, cfg = load_trained(adapter=tmp_path / "run" / "model")
    assert cfg.training.method == "full"


def test_clear_errors_for_missing_inputs(tmp_path, llama):
    path = llama_config(tmp_path, llama)
    with pytest.raises(ConfigError, match=r"model.path '.*nowhere' is not a folder"):
        train(load_config(path, ["--model.path", str(tmp_path / "nowhere")]), **QUIET)
    with pytest.raises(ConfigError, match=r"data file '.*missing.jsonl' does not exist"):
        train(load_config(path, ["--data.train", str(tmp_path / "missing.jsonl")]), **QUIET)
    with pytest.raises(ConfigError, match=r"Python package 'no_such_pkg' is not installed"):
        train(load_config(path, ["--model.path", "pkg:no_such_pkg"]), **QUIET)
    with pytest.raises(ConfigError, match=r"lora: .*matched no module"):
        train(load_config(path, ["--targets", "[nothing_here]"]), **QUIET)


def test_default_config_smoke(tmp_path):
    """The built-in QLoRA MiniLM run, cut down to a few steps on a slice of the data."""
    overrides = [
        "--max_steps", "3",
        "--max_train_samples", "96",
        "--max_eval_samples", "64",
        "--output_dir", str(tmp_path / "run"),
        "--save_every", "null",
        "--progress", "false",
    ]  # fmt: skip
    result = train(load_config(None, overrides), **QUIET)
    assert result.steps == 3
    assert "eval_accuracy" in result.eval_before and "eval_accuracy" in result.eval_after
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert result.weight_bytes < 60 * 2**20  # NF4 base: far below the 87 MiB float32 model


def test_causal_lm_example_config_runs(tmp_path, llama):
    """examples/causal_lm.yaml (instruction records, QLoRA, eval split) on the tiny Llama."""
    example = Path(__file__).resolve().parents[1] / "examples" / "causal_lm.yaml"
    overrides = ["--model.path", str(llama), "--max_steps", "2", "--batch_size", "2"]
    overrides += ["--grad_accum", "1", "--output_dir", str(tmp_path / "run"), "--progress", "false"]
    cfg = load_config(example, overrides)
    assert cfg.data.train.endswith("examples/instructions.jsonl")
    result = train(cfg, **QUIET)
    assert result.steps == 2 and "eval_loss" in result.eval_after
    saved = yaml.safe_load((tmp_path / "run" / "adapter" / "loraq_train.yaml").read_text())
    assert saved["lora"]["quant"] == "nf4"
