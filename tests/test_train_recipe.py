"""The training recipe's contracts: thread count kept on resume, empty evals reported, no
pickle in checkpoints, kill -9 safety, inference loading through load_adapter, and no
process-wide Hugging Face state left behind."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import loraq
from conftest import pattern_config, tiny_llama
from loraq.io.safe import FormatError
from loraq.io.tensor_tree import decode_tree, encode_tree, load_tree, save_tree
from loraq.train import checkpoint as ckpt
from loraq.train import loop
from loraq.train.config import from_flat, load_config
from loraq.train.hub import hub_offline, quiet_transformers
from loraq.train.inference import attach_adapter
from loraq.train.metrics import read_metrics

QUIET = {"log": lambda s: None}
SRC = str(Path(loraq.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def llama(llama_dir) -> Path:
    return llama_dir


def small_config(tmp_path: Path, llama: Path, **training) -> Path:
    return pattern_config(tmp_path, llama, {"r": 4, "alpha": 8}, **{"max_steps": 6, **training})


# ----------------------------------------------------------------------------- threads
def test_resume_reuses_the_recorded_thread_count(tmp_path, llama, monkeypatch):
    """``num_threads: null`` follows the load; a resumed run must use the count it started
    with, whatever the load is now."""
    path = small_config(tmp_path, llama, num_threads=None, save_every=2, eval_before=False)
    seen: dict[int, int] = {}

    def crash_at_3(step, loss):
        seen[step] = torch.get_num_threads()
        if step == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "auto_threads", lambda: 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(load_config(path), on_step=crash_at_3, **QUIET)
    assert set(seen.values()) == {2}
    saved = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.read_state(saved).num_threads == 2

    monkeypatch.setattr(loop, "auto_threads", lambda: 1)  # the machine got busier
    seen.clear()

    def record(step, loss):
        seen[step] = torch.get_num_threads()

    result = loop.train(load_config(path, ["--resume"]), on_step=record, **QUIET)
    assert result.steps == 6 and result.num_threads == 2
    assert set(seen.values()) == {2}
    final = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.read_state(final).num_threads == 2
    # A fresh run (no resume; --overwrite since the old checkpoints are there) picks again.
    fresh = loop.train(load_config(path, ["--overwrite"]), **QUIET)
    assert fresh.num_threads == 1


# ----------------------------------------------------------------------------- the seams
def test_recipe_seams_compose(tmp_path, llama):
    """setup / train_step / evaluate_session / finish, driven by hand as a recipe of one's own
    would (a distributed one wraps the model in setup and steps through the wrapper)."""

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, **batch):
            self.calls += 1
            return self.inner(**batch)

    cfg = load_config(small_config(tmp_path, llama, max_steps=2, num_threads=1, grad_accum=2))
    session = loop.setup(cfg, log=lambda s: None, wrap_model=Counting)
    assert session.wrapped.inner is session.model and session.stepping_model is session.wrapped
    stats = [loop.train_step(session) for _ in range(2)]
    assert session.wrapped.calls == 4 and session.state.step == 2  # 2 micro-batches per step
    assert all(s.loss > 0 and s.tokens > 0 for s in stats)
    scores = loop.evaluate_session(session, 2)
    assert scores["eval_loss"] > 0 and session.state.best_step == 2
    assert loop.save_session_checkpoint(session).name == "step-000002"
    session.metrics.close()
    result = loop.finish(session, started=0.0)
    assert result.steps == 2 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    quiet = loop.setup(cfg, log=lambda s: None, main_process=False)
    assert quiet.metrics is None and loop.save_session_checkpoint(quiet) is None


# ----------------------------------------------------------------------------- empty eval
def test_eval_without_labelled_tokens_says_so(tmp_path, llama):
    # An eval file was named but holds no example: nothing to score, and the run says so.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    lines: list[str] = []
    cfg = load_config(small_config(tmp_path, llama, max_steps=2, num_threads=1))
    cfg.data.eval = str(empty)
    result = loop.train(cfg, log=lines.append)
    assert result.eval_before == {} and result.eval_after == {}
    skipped = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_skipped" in r]
    assert [r["step"] for r in skipped] == [0, 2]
    assert "no labelled tokens" in skipped[0]["eval_skipped"]
    assert result.steps == 2  # training itself went on
    assert sum("eval skipped: the eval set has no labelled tokens" in line for line in lines) == 2


def test_cli_eval_without_labelled_tokens_is_an_error(tmp_path, llama, capsys):
    from loraq import cli

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert cli.main(["eval", "--model", str(llama), "--data", str(empty)]) == 2
    assert "no labelled tokens to score (0 examples)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints
def test_tensor_tree_round_trip_is_exact(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tree = {
        "optimizer": opt.state_dict(),
        "odd": {1: (float("inf"), float("-inf")), "__tuple__": [None, True, "x", 0.1]},
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "scalar": torch.tensor(7.0),
    }
    save_tree(tree, tmp_path / "t.json", tmp_path / "t.safetensors")
    back = load_tree(tmp_path / "t.json", tmp_path / "t.safetensors")
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert list(back["optimizer"]["state"]) == [0, 1]
    for idx, state in tree["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(back["optimizer"]["state"][idx][key], value), (idx, key)
    assert back["odd"] == tree["odd"]
    assert torch.equal(back["bf16"], tree["bf16"]) and back["scalar"].dim() == 0
    nan = decode_tree(encode_tree(float("nan"), {}), {})
    assert math.isnan(nan)
    with pytest.raises(TypeError, match="cannot store object at 'x'"):
        encode_tree({"x": object()}, {})
    with pytest.raises(FormatError, match=r"f.safetensors: tensor 'bf16' is missing"):
        decode_tree({"__tensor__": "bf16"}, {}, source="f.safetensors")


def test_old_pickle_checkpoint_is_refused_clearly(tmp_path, llama):
    path = small_config(tmp_path, llama, max_steps=2, save_every=2, num_threads=1)
    loop.train(load_config(path, ["--eval", "null"]), **QUIET)
    saved = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    (saved / ckpt.RESUME_JSON).unlink()
    (saved / "optimizer.pt").write_bytes(b"not read")
    with pytest.raises(FormatError, match="pickles, which loraq no longer reads"):
        loop.train(load_config(path, ["--resume", "--eval", "null"]), **QUIET)


def test_kill_9_while_checkpointing_leaves_the_newest_complete_one(tmp_path, llama):
    path = small_config(
        tmp_path, llama, max_steps=100000, save_every=1, keep_checkpoints=3, num_threads=1,
        eval_before=False,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraq.cli", "train", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    folder = tmp_path / "run" / "checkpoints"
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(ckpt.list_checkpoints(folder)) < 3:
            time.sleep(0.05)
        time.sleep(0.137)  # somewhere inside a step or a checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    newest = ckpt.latest_checkpoint(folder)
    assert newest is not None
    step = ckpt.read_state(newest).step
    result = loop.train(
        load_config(path, ["--resume", "--max_steps", str(step + 2), "--eval", "null"]), **QUIET
    )
    assert result.steps == step + 2 and len(result.losses) == 2


# ----------------------------------------------------------------------------- inference
def test_attach_adapter_is_load_adapter_all_or_nothing(tmp_path):
    trained = loraq.apply(tiny_llama(), loraq.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    loraq.save_adapter(trained, tmp_path / "adapter")
    run = from_flat({"model.path": "m", "data.train": "d", "lora.r": 4, "lora.quant": "nf4"})
    ok = attach_adapter(tiny_llama(), tmp_path / "adapter", run)
    assert any("lora_A" in n for n, _ in ok.named_parameters())
    # A file whose tensors do not fit: the failure leaves no adapter on the model.
    broken = loraq.apply(tiny_llama(), loraq.LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    loraq.save_adapter(broken, tmp_path / "broken")
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    (tmp_path / "broken" / "adapter_config.json").write_text(config)
    for options in (run, None):
        model = tiny_llama()
        with pytest.raises(ValueError, match="shape"):
            attach_adapter(model, tmp_path / "broken", options)
        assert not any("lora_" in n for n, _ in model.named_parameters()), options


# ----------------------------------------------------------------------------- hub state
def test_importing_the_cli_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import os, loraq.cli; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PYTHONPATH": SRC}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "None"


def test_offline_mode_is_restored(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with quiet_transformers():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(KeyError), hub_offline():
        raise KeyError("restored on errors too")
    assert os.environ["HF_HUB_OFFLINE"] == "0" and constants.HF_HUB_OFFLINE is False
