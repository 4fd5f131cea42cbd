"""``training.eval_tasks``: lm-eval tasks scored at each evaluation of ``loraq train``.

The tiny byte-level Llama of :mod:`tiny_lm` trains a LoRA adapter for two steps on a line of text
and scores the shipped task ``examples/eval/loraq_tiny_mc`` (two documents: ``eval_task_limit``)
before, after each step and at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import loraq
from loraq import cli
from loraq.train.config import ConfigError, load_config
from loraq.train.loop import train
from loraq.train.metrics import TASK_PREFIX, read_metrics
from test_train_support import write_config
from tiny_lm import (  # noqa: F401
    byte_tokenizer,
    randomize_adapters,
    save_tiny_folder,
    single_thread,
    tiny_causal_lm,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval"
TASK = "loraq_tiny_mc"
QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_folder(tmp_path_factory.mktemp("tasks") / "base")


def _config(root: Path, base: Path, **training) -> Path:
    data = root / "train.jsonl"
    rows = [{"prompt": "Question: The sun rises in the", "completion": " east"}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    body = {
        "model": {"path": str(base), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": 48},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "compute_dtype": "float32"},
        "training": {
            "max_steps": 2,
            "batch_size": 4,
            "lr": 5e-2,
            "eval_every": 1,
            "eval_tasks": [TASK],
            "eval_include_path": [str(EXAMPLES)],
            "eval_task_limit": 2,
            "output_dir": str(root / "run"),
            "progress": False,
            "num_threads": 1,
            **training,
        },
    }
    return write_config(root / "config.yaml", body)


# ----------------------------------------------------------------------------- the config
def test_config_keys_default_off_and_checked(tmp_path, base):
    from loraq.train.schema import TrainingConfig

    default = TrainingConfig()
    assert default.eval_tasks is None and default.eval_include_path is None
    assert default.eval_task_limit == 32
    path = _config(tmp_path, base, eval_include_path="tasks")
    cfg = load_config(path)  # a folder relative to the config file's; one folder: a list
    assert cfg.training.eval_include_path == [str((tmp_path / "tasks").resolve())]
    override = {"training.eval_include_path": ["tasks"]}  # on the command line: to the cwd
    assert load_config(path, override).training.eval_include_path == [str(Path.cwd() / "tasks")]
    assert load_config(path, ["--eval_tasks", "x"]).training.eval_tasks == ["x"]
    with pytest.raises(ConfigError, match="training.eval_task_limit must be > 0"):
        load_config(path, {"training.eval_task_limit": 0})
    with pytest.raises(ConfigError, match="training.eval_tasks .* needs model.task 'causal-lm'"):
        load_config(path, {"model.task": "seq-cls"})
    with pytest.raises(ConfigError, match="training.eval_tasks holds an empty task name"):
        load_config(path, {"training.eval_tasks": [TASK, " "]})


def test_help_lists_the_keys():
    from loraq.train.config import describe_keys

    text = describe_keys()
    for key in ("eval_tasks=None", "eval_include_path=None", "eval_task_limit=32"):
        assert key in text


# ----------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def runs(tmp_path_factory, base):
    """The same two steps trained with the task at every evaluation and without any eval."""
    pytest.importorskip("lm_eval")
    with_tasks = tmp_path_factory.mktemp("with")
    plain = tmp_path_factory.mktemp("plain")
    scored = train(load_config(_config(with_tasks, base)), **QUIET)
    off = {"training.eval_tasks": None}
    unscored = train(load_config(_config(plain, base), off), **QUIET)
    return with_tasks / "run", scored, unscored


def test_task_scores_at_each_evaluation_in_metrics_and_plot(runs):
    run, scored, _ = runs
    lines = [
        r for r in read_metrics(run / "metrics.jsonl") if any(k.startswith(TASK_PREFIX) for k in r)
    ]
    assert [r["step"] for r in lines] == [0, 1, 2]  # before, after step 1, at the end
    for line in lines:
        assert set(line) == {"step", f"{TASK_PREFIX}{TASK}/acc", f"{TASK_PREFIX}{TASK}/acc_norm"}
        assert all(0.0 <= line[k] <= 1.0 for k in line if k != "step")
    assert scored.eval_after == {k: v for k, v in lines[-1].items() if k != "step"}
    assert (run / "loss.png").stat().st_size > 0
    assert not (run / "metrics.jsonl").read_text().count("eval_skipped")  # no eval set: no loss


def test_scoring_does_not_change_the_training(runs):
    """Eval mode for the scoring, train mode (dropout 0.1) after, the random state kept: the
    losses equal those of the same run without evaluations."""
    _, scored, unscored = runs
    assert len(scored.losses) == 2
    assert scored.losses == unscored.losses


def test_the_final_scores_are_the_trained_adapters(runs):
    """The last evaluation scores the model with its adapter active: what ``loraq eval --tasks``
    gives for the saved adapter."""
    from loraq.eval.harness import score_tasks
    from loraq.eval.variants import variants
    from loraq.train.inference import load_with_adapters

    run, scored, _ = runs
    model, tokenizer = load_with_adapters(None, {"trained": run / "adapter"})
    columns = variants(["trained"])[1:]
    theirs = score_tasks(model, tokenizer, [TASK], columns, include_path=[EXAMPLES], limit=2)
    result = theirs[columns[0].name]["results"][TASK]
    assert scored.eval_after[f"{TASK_PREFIX}{TASK}/acc"] == result["acc,none"]
    assert scored.eval_after[f"{TASK_PREFIX}{TASK}/acc_norm"] == result["acc_norm,none"]


def test_scorer_uses_eval_mode_and_the_active_adapter(monkeypatch):
    """The per-request log-likelihoods lm-eval computes are those of the adapter, in eval mode;
    the model is back in train mode after."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from loraq.eval.during_training import TaskScorer
    from loraq.eval.harness import score_tasks
    from loraq.eval.variants import variants

    model = tiny_causal_lm()
    loraq.apply(model, loraq.LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.5), "a")
    randomize_adapters(model)
    tokenizer = byte_tokenizer()
    seen, modes = [], []
    call = HFLM.loglikelihood

    def recorded(self, requests, *args, **kwargs):
        out = call(self, requests, *args, **kwargs)
        seen.append([ll for ll, _ in out])
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", recorded)
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    scorer = TaskScorer([TASK], [EXAMPLES], limit=2)
    model.train()
    rng = torch.get_rng_state()
    scores = scorer(model, tokenizer)
    assert model.training and modes and not any(modes)
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(scores) == {f"{TASK}/acc", f"{TASK}/acc_norm"}
    mine = seen.pop()
    for column in variants(["a"]):  # the base, then adapter a
        score_tasks(model, tokenizer, [TASK], [column], include_path=[EXAMPLES], limit=2)
    base, adapter = seen
    assert mine == pytest.approx(adapter, abs=1e-5)
    assert max(abs(x - y) for x, y in zip(mine, base)) > 1e-2


# ----------------------------------------------------------------------------- errors
def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_without_lm_eval_one_line_names_the_key(tmp_path, base, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert cli.main(["train", str(_config(tmp_path, base))]) == 2
    err = _one_line(capsys)
    assert "training.eval_tasks" in err and "pip install 'loraq[eval]'" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unknown_task_one_line_names_it(tmp_path, base, capsys):
    pytest.importorskip("lm_eval")
    path = _config(tmp_path, base, eval_tasks=["no_such_task_xyz"])
    assert cli.main(["train", str(path)]) == 2
    err = _one_line(capsys)
    assert "training.eval_tasks" in err and "no_such_task_xyz" in err


def test_plot_has_a_panel_for_the_task_scores(tmp_path):
    """loss.png gains a panel (the figure one panel wider) when eval lines hold task scores."""
    import struct

    from loraq.train.metrics import plot_metrics

    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    records += [{"step": 4, "eval_loss": 0.3}]
    scores = [{"step": s, f"{TASK_PREFIX}{TASK}/acc": 0.25 * s} for s in (0, 2, 4)]

    def width(path: Path) -> int:
        return struct.unpack(">I", path.read_bytes()[16:20])[0]  # the PNG header's IHDR width

    plain = plot_metrics(records, tmp_path / "plain.png")
    tasks = plot_metrics(records + scores, tmp_path / "tasks.png")
    assert width(tasks) == 2 * width(plain)
