"""``loraq compare`` on a preference config (``training.method: dpo`` / ``orpo``): every adapter
method trains by that objective and the report compares the held-out pairs' reward accuracy
and margin, not SFT numbers."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from loraq import cli
from loraq.compare import CompareError, Run, run_config
from loraq.compare.methods import default_methods
from test_dpo import dpo_config
from tiny_lm import save_tiny_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("cmp_pref") / "model")


def _compare(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli.main(["compare", *argv])
    return code, stdout.getvalue(), stderr.getvalue()


def test_dpo_compare_reports_reward_accuracy_and_margin(tmp_path, model_dir):
    """Two adapter methods by DPO: each run trains by DPO, and the table's metric is the eval
    pairs' reward accuracy (0 before training: the policy is the reference) and margin."""
    cfg = dpo_config(tmp_path, model_dir)
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    argv = [str(tmp_path / "dpo.yaml"), "--methods", "lora,qlora", "--steps", "3"]
    code, text, err = _compare(
        [*argv, "--out", str(out), "--data.eval", str(pairs), "--lr", "5e-2"]
    )
    assert code == 0, err[-3000:]
    header = text.splitlines()[0]
    assert "| rewards/accuracies ↑ | Δ vs start | reward margin ↑ |" in header
    assert "loss ↓" not in header
    report = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert report["settings"]["objective"] == "dpo"
    for run in report["runs"]:
        assert run["ok"] and run["metric"] == "eval_rewards/accuracies"
        assert run["metric_start"] == 0.0 and run["metric_final"] == 1.0
        assert run["eval_after"]["eval_rewards/margins"] > 0
        saved = yaml.safe_load((out / "runs" / run["slug"] / "config.yaml").read_text())
        assert saved["training"]["method"] == "dpo"
    assert {r["method"] for r in report["runs"]} == {"lora", "qlora"}
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "objective dpo (beta 0.1)" in md and "*reward margin*" in md
    assert cfg.training.method == "dpo"


def test_orpo_objective_can_be_given_on_the_command_line(tmp_path, model_dir):
    dpo_config(tmp_path, model_dir)
    out = tmp_path / "out"
    argv = [str(tmp_path / "dpo.yaml"), "--methods", "lora", "--steps", "2", "--out", str(out)]
    code, text, err = _compare([*argv, "--training.method", "orpo"])
    assert code == 0, err[-3000:]
    (run,) = json.loads((out / "compare.json").read_text(encoding="utf-8"))["runs"]
    assert run["ok"] and run["metric"] == "eval_rewards/accuracies"
    saved = yaml.safe_load((out / "runs" / "lora-r4" / "config.yaml").read_text())
    assert saved["training"]["method"] == "orpo"


def test_full_fine_tuning_is_refused_for_preferences(tmp_path, model_dir, capsys):
    cfg = dpo_config(tmp_path, model_dir)
    assert "full" not in default_methods(cfg) and "lora" in default_methods(cfg)
    with pytest.raises(CompareError, match="training.method 'dpo' trains adapters only"):
        run_config(cfg, Run("full", None), tmp_path / "f", threads=1, full_lr=None)
    assert run_config(cfg, Run("int8", 8), tmp_path / "i", 1, None).training.method == "dpo"
    argv = ["compare", str(tmp_path / "dpo.yaml"), "--methods", "full,lora"]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraq compare: error: full: training.method 'dpo'") and "\n" not in err
    assert cli.main([*argv, "--training.method", "lora"]) == 2
    assert "--training.method is set by loraq compare" in capsys.readouterr().err
