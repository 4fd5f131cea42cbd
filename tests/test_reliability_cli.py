"""Every mistake a user can make on the command line ends as one line and a non-zero exit code.

The table below walks bad values, unreadable / non-UTF-8 / missing files, unwritable outputs and
failed loads through ``loraq.cli.main`` and checks the report: exactly one line
``loraq <command>: error: <what>`` naming the key, file or row, no traceback, exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraq import cli
from loraq.train.config import ConfigError
from test_train_support import make_tiny_llama, write_config, write_pattern_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, good and bad data files, configs, and a corrupt adapter."""
    from transformers import AutoModelForCausalLM

    import loraq

    tmp = tmp_path_factory.mktemp("bad_cli")
    llama = make_tiny_llama(tmp / "llama")
    data = write_pattern_jsonl(tmp / "data.jsonl", n=4)
    files = {"tmp": tmp, "llama": llama, "data": data}
    files["config"] = write_config(
        tmp / "ok.yaml",
        {
            "model": {"path": str(llama), "task": "causal-lm"},
            "data": {"train": str(data), "max_length": 32},
            "training": {"max_steps": 1, "progress": False, "output_dir": str(tmp / "run")},
        },
    )
    (tmp / "latin1.yaml").write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    (tmp / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp / "extra.tsv").write_text("text\tlabel\na\tpos\nb\tneg\tx\n", encoding="utf-8")
    (tmp / "one.jsonl").write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    (tmp / "a_file").write_text("not a folder", encoding="utf-8")
    (tmp / "weights.bin").write_bytes(b"\x80\x04K\x01.")
    model = AutoModelForCausalLM.from_pretrained(str(llama))
    loraq.apply(model, loraq.LoraConfig(r=4, targets=["q_proj"]))
    adapter = loraq.save_adapter(model, tmp / "nan_adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    files["nan_key"] = Path(key)
    bad_json = tmp / "bad_json_adapter"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{oops", encoding="utf-8")
    return files


# (argv built from the files, the words the one line must contain)
CASES = {
    "missing config file": (
        lambda f: ["train", str(f["tmp"] / "nope.yaml")],
        ["nope.yaml", "does not exist"],
    ),
    "non-UTF-8 config": (
        lambda f: ["train", str(f["tmp"] / "latin1.yaml")],
        ["latin1.yaml", "UTF-8"],
    ),
    "unknown key": (lambda f: ["train", str(f["config"]), "--lora.rr", "4"], ["lora.rr"]),
    "NaN alpha": (
        lambda f: ["train", str(f["config"]), "--lora.alpha", "nan"],
        ["LoraConfig.alpha", "nan"],
    ),
    "infinite lr": (
        lambda f: ["train", str(f["config"]), "--lr", "inf"],
        ["training.lr", "finite"],
    ),
    "negative batch": (lambda f: ["train", str(f["config"]), "--batch_size", "-3"], ["batch_size"]),
    "catastrophic regex": (
        lambda f: ["train", str(f["config"]), "--lora.targets", "(.+)+X"],
        ["LoraConfig.targets", "bounded time"],
    ),
    "missing data file": (
        lambda f: ["train", str(f["config"]), "--data.train", str(f["tmp"] / "gone.jsonl")],
        ["gone.jsonl", "does not exist"],
    ),
    "non-UTF-8 data": (
        lambda f: ["train", str(f["config"]), "--data.train", str(f["tmp"] / "latin1.jsonl")],
        ["latin1.jsonl", "UTF-8"],
    ),
    "TSV row with an extra field": (
        lambda f: [
            "train",
            str(f["config"]),
            "--data.train",
            str(f["tmp"] / "extra.tsv"),
            "--task",
            "seq-cls",
        ],
        ["extra.tsv", "line 3", "3 field"],
    ),
    "eval split takes everything": (
        lambda f: [
            "train",
            str(f["config"]),
            "--data.train",
            str(f["tmp"] / "one.jsonl"),
            "--eval_split",
            "0.2",
        ],
        ["data.eval_split", "one.jsonl"],
    ),
    "rank above layer size": (
        lambda f: ["train", str(f["config"]), "--lora.r", "4096"],
        ["LoraConfig.r=4096", "min(in, out)"],
    ),
    "unwritable output": (
        lambda f: ["train", str(f["config"]), "--output_dir", str(f["tmp"] / "a_file" / "run")],
        ["a_file"],
    ),
    "eval negative batch size": (
        lambda f: [
            "eval",
            "--model",
            str(f["llama"]),
            "--data",
            str(f["data"]),
            "--batch-size",
            "-3",
        ],
        ["--batch-size", "positive integer", "-3"],
    ),
    "eval missing data": (
        lambda f: ["eval", "--model", str(f["llama"]), "--data", str(f["tmp"] / "gone.jsonl")],
        ["gone.jsonl"],
    ),
    "eval non-UTF-8 data": (
        lambda f: ["eval", "--model", str(f["llama"]), "--data", str(f["tmp"] / "latin1.jsonl")],
        ["latin1.jsonl", "UTF-8"],
    ),
    "eval missing adapter": (
        lambda f: ["eval", "--adapter", str(f["tmp"] / "none"), "--data", str(f["data"])],
        ["none"],
    ),
    "eval adapter with NaN": (
        lambda f: [
            "eval",
            "--model",
            str(f["llama"]),
            "--adapter",
            str(f["tmp"] / "nan_adapter"),
            "--data",
            str(f["data"]),
        ],
        ["NaN or Inf", "adapter_model.safetensors"],
    ),
    "eval adapter with bad JSON": (
        lambda f: [
            "eval",
            "--model",
            str(f["llama"]),
            "--adapter",
            str(f["tmp"] / "bad_json_adapter"),
            "--data",
            str(f["data"]),
        ],
        ["adapter_config.json", "not valid JSON"],
    ),
    "eval missing model": (
        lambda f: ["eval", "--model", str(f["tmp"] / "no_model"), "--data", str(f["data"])],
        ["model.path", "no_model"],
    ),
    "generate top-p out of range": (
        lambda f: ["generate", "--model", str(f["llama"]), "--top-p", "2", "hi"],
        ["--top-p", "(0, 1]"],
    ),
    "generate negative max tokens": (
        lambda f: ["generate", "--model", str(f["llama"]), "--max-new-tokens", "-1", "hi"],
        ["--max-new-tokens"],
    ),
    "inspect a pickle": (
        lambda f: ["inspect", str(f["tmp"] / "weights.bin")],
        ["weights.bin", "pickle"],
    ),
    "inspect a missing path": (lambda f: ["inspect", str(f["tmp"] / "gone")], ["gone"]),
    "unknown option": (lambda f: ["eval", "--data", "x.jsonl", "--bogus"], ["--bogus"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_code(world, case: str, capsys) -> None:
    build, words = CASES[case]
    code = cli.main(build(world))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    command = build(world)[0]
    assert lines[0].startswith(f"loraq {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_debug_shows_the_traceback(world) -> None:
    argv = ["train", str(world["config"]), "--lr", "inf"]
    with pytest.raises(ConfigError, match="training.lr"):
        cli.main([*argv, "--debug"])
    with pytest.raises(ConfigError, match="training.lr"):
        cli.main(["--debug", *argv])


def test_genuine_bugs_keep_their_traceback() -> None:
    def run(args: argparse.Namespace) -> int:
        return {}["missing"]

    cli.register("buggy", cli.Subcommand("raise a bug", lambda p: None, run))
    try:
        with pytest.raises(KeyError):
            cli.main(["buggy"])
    finally:
        del cli.SUBCOMMANDS["buggy"]


def test_disk_full_is_one_line_naming_the_path(tmp_path, capsys) -> None:
    import errno

    def run(args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    cli.register("fill", cli.Subcommand("fill the disk", lambda p: None, run))
    try:
        assert cli.main(["fill"]) == 2
    finally:
        del cli.SUBCOMMANDS["fill"]
    err = capsys.readouterr().err.strip()
    assert err == f"loraq fill: error: no space left on device ({tmp_path / 'out'})"


def test_eval_with_nothing_to_score_is_an_error(world, capsys) -> None:
    empty = world["tmp"] / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    code = cli.main(["eval", "--model", str(world["llama"]), "--data", str(empty)])
    assert code == 2
    assert "no labelled tokens to score" in capsys.readouterr().err
