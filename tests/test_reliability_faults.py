"""Faults while writing: a full disk, folders left by killed runs, and old runs never lost."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from loraq import cli
from loraq.train import checkpoint as ckpt
from loraq.train.config import ConfigError, load_config
from loraq.train.loop import train
from test_train_support import make_tiny_llama, write_config, write_pattern_jsonl

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("faults") / "llama")


def config(tmp: Path, llama: Path, **training) -> Path:
    data = write_pattern_jsonl(tmp / "data.jsonl", n=8)
    return write_config(
        tmp / "config.yaml",
        {
            "model": {"path": str(llama), "task": "causal-lm"},
            "data": {"train": str(data), "max_length": 32},
            "lora": {"r": 4, "alpha": 8},
            "training": {
                "batch_size": 4,
                "max_steps": 6,
                "save_every": 2,
                "eval_before": False,
                "progress": False,
                "output_dir": str(tmp / "run"),
                **training,
            },
        },
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_disk_full_during_checkpoint(tmp_path, llama, monkeypatch, capsys) -> None:
    path = config(tmp_path, llama)
    real_save = ckpt.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4): half a file, then ENOSPC
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    assert cli.main(["train", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    folder = tmp_path / "run" / "checkpoints"
    assert err == [f"loraq train: error: no space left on device ({folder / 'step-000004'})"]
    # The partial folder is gone; the earlier checkpoint is complete and resumable.
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    resumed = train(load_config(path, ["--resume"]), **QUIET)
    assert resumed.steps == 6 and len(resumed.losses) == 4


def test_disk_full_in_the_library_names_the_checkpoint(tmp_path, llama, monkeypatch) -> None:
    path = config(tmp_path, llama)

    def full_disk(tensors, filename, *args, **kwargs):
        raise RuntimeError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        )

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(OSError, match=r"no space left on device.*step-000002") as info:
        train(load_config(path), **QUIET)
    assert info.value.errno == errno.ENOSPC
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_orphan_folders_of_killed_runs_are_cleaned(tmp_path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    pid = dead_pid()
    (folder / "step-000002").mkdir()
    (folder / f".tmp-step-000004-{pid}").mkdir()
    (folder / f".tmp-step-000004-{pid}" / "trainable.safetensors").write_bytes(b"\0")
    (folder / f".old-step-000002-{pid}").mkdir()  # replaced or pruned, then killed
    (folder / f".old-step-000006-{pid}").mkdir()  # maybe half-deleted: never trusted
    (folder / f".tmp-step-000008-{1}").mkdir()  # pid 1 is alive: not ours to touch
    removed = ckpt.remove_orphans(folder)
    assert sorted(p.name for p in removed) == [
        f".old-step-000002-{pid}",
        f".old-step-000006-{pid}",
        f".tmp-step-000004-{pid}",
    ]
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-step-000008-1", "step-000002"]


def test_training_start_removes_orphans(tmp_path, llama) -> None:
    path = config(tmp_path, llama, max_steps=2)
    pid = dead_pid()
    run = tmp_path / "run"
    (run / "checkpoints" / f".tmp-step-000004-{pid}").mkdir(parents=True)
    (run / f".tmp-adapter-{pid}").mkdir()
    train(load_config(path), **QUIET)
    assert not (run / "checkpoints" / f".tmp-step-000004-{pid}").exists()
    assert not (run / f".tmp-adapter-{pid}").exists()


def test_starting_afresh_over_old_checkpoints_needs_overwrite(tmp_path, llama) -> None:
    path = config(tmp_path, llama, max_steps=4)
    train(load_config(path), **QUIET)
    folder = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["step-000002", "step-000004"]
    with pytest.raises(ConfigError, match=r"2 checkpoint\(s\).*--resume.*--overwrite"):
        train(load_config(path), **QUIET)
    assert sorted(p.name for p in folder.iterdir()) == before
    result = train(load_config(path, ["--overwrite", "--max_steps", "2"]), **QUIET)
    assert result.steps == 2
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002"]
