"""The ``loraq`` command line: train / eval / generate / merge on tiny models, and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conftest import pattern_config, sentiment_config
from loraq import cli
from test_train_support import write_config


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama_dir):
    """A tiny Llama trained through `loraq train` on a repeated pattern."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "llama").symlink_to(llama_dir, target_is_directory=True)
    config = pattern_config(tmp, tmp / "llama")
    code = cli.main(
        ["train", str(config), "--max_steps", "40", "--training.output_dir", str(tmp / "run")]
    )
    assert code == 0
    return tmp


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "eval", "generate", "merge"):
        assert name in out
    assert cli.main([]) == 2
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora.r 16" in out
    assert "compute_dtype=auto" in out and "compute_dtype=float32" not in out  # the real default


def test_unknown_override_suggests_key(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {"model": {"path": "m"}, "data": {"train": "d.txt"}})
    assert cli.main(["train", str(config), "--lora.rr", "4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'lora.rr'; did you mean 'lora.r'?" in err
    assert "Traceback" not in err
    assert cli.main(["train", str(config), "--learning-rate", "1e-3"]) == 2
    assert "did you mean 'training.lr'?" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_writes_run_folder(llama_run, capsys):
    run = llama_run / "run"
    assert {p.name for p in run.iterdir()} >= {
        "adapter",
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
    }


def test_generate_greedy_and_sampled(llama_run, capsys):
    adapter = str(llama_run / "run" / "adapter")
    assert cli.main(["generate", "--adapter", adapter, "abc:", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == "xyzxyz"
    outs = []
    for _ in range(2):
        argv = ["generate", "--adapter", adapter, "abc:", "--temperature", "1.5", "--seed", "3"]
        assert cli.main([*argv, "--top-k", "5", "--top-p", "0.95"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_eval_reports_loss_and_perplexity(llama_run, capsys):
    adapter = str(llama_run / "run" / "adapter")
    data = str(llama_run / "pattern.jsonl")
    assert cli.main(["eval", "--adapter", adapter, "--data", data, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 16
    assert scores["eval_loss"] < 0.05 and scores["eval_perplexity"] < 1.06
    # The base model alone knows nothing of the pattern.
    base = str(llama_run / "llama")
    assert cli.main(["eval", "--model", base, "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] > 3.0


def test_merge_gives_a_dense_model_that_generates_the_same(llama_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraq.generation.decode import generate

    out = llama_run / "merged"
    code = cli.main(["merge", "--adapter", str(llama_run / "run" / "adapter"), "--out", str(out)])
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert generate(model, tokenizer, ["abc:"], max_new_tokens=12) == ["xyzxyz"]
    assert cli.main(["generate", "--model", str(out), "abc:", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().endswith("xyzxyz")


def test_seq_cls_train_then_eval(tmp_path, capsys, bert_dir):
    config = sentiment_config(tmp_path, bert_dir, max_steps=30)
    data = tmp_path / "s.tsv"
    assert cli.main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "eval before training: loss" in out and "accuracy" in out
    assert "trainable params" in out and "peak memory (RSS)" in out and "best eval accuracy" in out
    adapter = str(tmp_path / "run" / "adapter")
    assert cli.main(["eval", "--adapter", adapter, "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_accuracy"] >= 0.95


def test_eval_errors(tmp_path, capsys):
    assert cli.main(["eval", "--data", "x.jsonl"]) == 2
    assert "needs --adapter DIR or --model PATH" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", str(tmp_path / "none"), "--data", "x.jsonl"]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_register_adds_a_subcommand(capsys):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        print("hello" * args.n)
        return 0

    cli.register("hello", cli.Subcommand("say hello", add, run))
    try:
        assert cli.main(["hello", "--n", "2"]) == 0
        assert capsys.readouterr().out.strip() == "hellohello"
    finally:
        del cli.SUBCOMMANDS["hello"]
    assert Path(cli.__file__).name == "cli.py"
