"""The environment is input too: a bad ``LORAQ_KERNELS`` or ``LORAQ_CPU_BF16`` value, or ``LORAQ_KERNELS=on`` on a
machine without a C compiler, ends as one line ``loraq <command>: error: ...`` and exit code 2,
like every other user mistake (see test_reliability_cli.py); files other tools write (a UTF-8
byte-order mark) are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraq import cli
from loraq.native import bernoulli, dequant
from test_train_support import make_tiny_bert, write_config, write_pattern_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, a config that trains it for one step on an NF4 base, and a tiny BERT."""
    tmp = tmp_path_factory.mktemp("bad_env")
    from test_train_support import make_tiny_llama

    llama = make_tiny_llama(tmp / "llama")
    data = write_pattern_jsonl(tmp / "data.jsonl", n=4)
    config = write_config(
        tmp / "nf4.yaml",
        {
            "model": {"path": str(llama), "task": "causal-lm"},
            "data": {"train": str(data), "max_length": 32},
            "lora": {"r": 4, "alpha": 8, "quant": "nf4", "compute_dtype": "float32"},
            "training": {"max_steps": 1, "progress": False, "output_dir": str(tmp / "run")},
        },
    )
    return {"tmp": tmp, "llama": llama, "config": config, "bert": make_tiny_bert(tmp / "bert")}


@pytest.fixture
def fresh_kernels():
    """Forget the kernels this process loaded, so the test's environment decides again."""

    def clear() -> None:
        dequant._library.cache_clear()
        bernoulli._library.cache_clear()
        bernoulli.exact_kernel_available.cache_clear()

    clear()
    yield
    clear()


# (environment, argv built from the files, the words the one line must contain)
CASES = {
    "unknown LORAQ_KERNELS": (
        {"LORAQ_KERNELS": "maybe"},
        lambda f: ["train", str(f["config"])],
        ["LORAQ_KERNELS='maybe'", "auto", "off", "on"],
    ),
    "unknown LORAQ_KERNELS, inspect": (
        {"LORAQ_KERNELS": "fast"},
        lambda f: ["inspect", str(f["llama"])],
        ["LORAQ_KERNELS='fast'", "auto, off"],
    ),
    "unknown LORAQ_CPU_BF16": (
        {"LORAQ_CPU_BF16": "amx"},
        lambda f: ["inspect", str(f["llama"])],
        ["LORAQ_CPU_BF16='amx'", "auto, off"],
    ),
    "LORAQ_KERNELS=on without a compiler": (
        {"LORAQ_KERNELS": "on", "CC": "/nonexistent/cc", "PATH": "{tmp}"},
        lambda f: ["train", str(f["config"])],
        ["LORAQ_KERNELS=on", "no C compiler", "LORAQ_KERNELS=auto"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_environment_gives_one_line_and_exit_code(
    world, case: str, capsys, monkeypatch, fresh_kernels
) -> None:
    env, build, words = CASES[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=world["tmp"]))
    argv = build(world)
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"loraq {argv[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("value", ["auto", "", "OFF", " on ", "0", "1", "true", "no"])
def test_documented_kernel_values_are_accepted(monkeypatch, value: str) -> None:
    from loraq.core import precision
    from loraq.native import build

    monkeypatch.setenv(build.MODE_ENV, value)
    assert build.mode() in build.MODE_VALUES
    monkeypatch.setenv(precision.CPU_BF16_ENV, value)
    assert precision.fast_bf16("cpu") in (True, False)


def test_train_reads_a_tsv_with_a_byte_order_mark(world, capsys) -> None:
    # Excel's "UTF-8 CSV" and Notepad start the file with U+FEFF before the header
    lines = ["text\tlabel"] + [
        f"{w} day\t{'pos' if w == 'good' else 'neg'}" for w in ["good", "bad"] * 8
    ]
    data = world["tmp"] / "bom.tsv"
    data.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))
    config = write_config(
        world["tmp"] / "bom.yaml",
        {
            "model": {"path": str(world["bert"]), "task": "seq-cls"},
            "data": {"train": str(data), "max_length": 16},
            "lora": {"r": 2, "alpha": 4, "compute_dtype": "float32"},
            "training": {"max_steps": 1, "progress": False, "output_dir": str(world["tmp"] / "b")},
        },
    )
    code = cli.main(["train", str(config)])
    assert code == 0, capsys.readouterr().err
