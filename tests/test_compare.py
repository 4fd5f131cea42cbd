"""``loraq compare`` on a tiny random BERT: the command, its files, the table's relations, errors."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import sentiment_config
from loraq import cli
from loraq.compare import (
    FULL_LR_FACTOR,
    METHODS,
    CompareError,
    CompareReport,
    Run,
    RunResult,
    parse_methods,
    parse_ranks,
    plan_runs,
    run_config,
    warmup_steps_of,
    write_outputs,
)
from loraq.compare.command import split_compare_options as split_options
from loraq.compare.report import size_text
from loraq.train.config import load_config

STEPS = 4
COMPARED = ("full", "lora", "qlora", "qlora-a4")


def tiny_config(root: Path, bert: Path) -> Path:
    """A seq-cls config over a tiny random BERT; its lora section asks for QLoRA (as the
    built-in default does), which compare must override per method."""
    return sentiment_config(root, bert, {"r": 8, "alpha": 16, "quant": "nf4"}, num_threads=1)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, bert_dir) -> dict:
    """One ``loraq compare`` of four methods (four worker processes), shared by the tests."""
    root = tmp_path_factory.mktemp("compare")
    out = root / "out"
    argv = ["compare", str(tiny_config(root, bert_dir)), "--methods", ",".join(COMPARED)]
    argv += ["--steps", str(STEPS), f"--out={out}"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli.main(argv)
    report = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
        "out": out,
        "report": report,
        "runs": {r["method"]: r for r in report["runs"]},
    }


def test_compare_finishes_and_writes_table_json_md_png(compared):
    assert compared["code"] == 0, compared["stderr"]
    out, text = compared["out"], compared["stdout"]
    header = text.splitlines()[0]
    for column in ("trainable params", "frozen weights", "saved file", "peak RSS", "step time"):
        assert column in header
    assert "accuracy ↑" in header and "Δ vs start" in header
    for method in COMPARED:
        assert f"| {method} |" in text
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert header in md and "Columns:" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = compared["report"]["environment"]
    for key in ("torch", "python", "loraq", "cpu", "threads", "device", "transformers"):
        assert env[key] not in (None, "")
    assert env["threads"] == 1  # the config's num_threads, shared by every run
    settings = compared["report"]["settings"]
    assert settings["steps"] == STEPS and settings["full_lr"] == pytest.approx(
        1e-2 * FULL_LR_FACTOR
    )


def test_every_run_measured_the_same_budget(compared):
    runs = compared["runs"]
    assert set(runs) == set(COMPARED) and all(r["ok"] for r in runs.values())
    tokens = [r["step_tokens"] for r in runs.values()]
    assert all(t == tokens[0] for t in tokens) and len(tokens[0]) == STEPS  # same batches
    for r in runs.values():
        assert r["steps"] == STEPS and len(r["step_times_s"]) == STEPS
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_rss_source"] == "VmHWM"
        assert r["peak_rss_bytes"] >= r["train_peak_rss_bytes"] > r["baseline_rss_bytes"] > 0
        assert r["metric"] == "eval_accuracy"
        assert r["metric_delta"] == pytest.approx(r["metric_final"] - r["metric_start"])
        assert r["eval_before"] and r["eval_after"]
    assert runs["full"]["lr"] == pytest.approx(1e-2 * FULL_LR_FACTOR)
    assert runs["lora"]["lr"] == pytest.approx(1e-2)


def test_table_relations_hold(compared):
    full, lora, qlora, a4 = (compared["runs"][m] for m in COMPARED)
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert qlora["trainable_params"] == lora["trainable_params"] == a4["trainable_params"]
    # The frozen base: NF4 < float32; and the whole training state (weights, grads, AdamW).
    assert qlora["frozen_bytes"] < lora["frozen_bytes"]
    assert qlora["state_bytes"] < lora["state_bytes"] < full["state_bytes"]
    assert a4["frozen_bytes"] == qlora["frozen_bytes"]
    # Saved files: the adapter is a small fraction of the full model.
    assert lora["saved_bytes"] < full["saved_bytes"] / 2
    assert lora["saved_files"] == ["adapter_model.safetensors"]
    assert a4["saved_files"] == ["adapter_model.codes.safetensors"]


def test_printed_saved_file_is_the_bytes_written(compared):
    # The README once quoted a 4-bit adapter as 436.93 KiB where the run wrote 271.91 KiB: the
    # table's "saved file" must be the size of the weight files on disk, for every method.
    lines = compared["stdout"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("saved file")
    for method, run in compared["runs"].items():
        folder = Path(run["run_dir"]) / ("model" if method == "full" else "adapter")
        written = sorted(folder.glob("*.safetensors"))
        assert [f.name for f in written] == run["saved_files"] and written
        on_disk = sum(f.stat().st_size for f in written)
        assert run["saved_bytes"] == on_disk
        row = next(line for line in lines if line.startswith(f"| {method} |"))
        printed = [c.strip() for c in row.strip("|").split("|")][column]
        assert printed == size_text(on_disk), (method, printed, on_disk)


def _adapter_matrix_bytes(path: Path) -> tuple[int, int]:
    """(bytes of lora_A/lora_B weights or codes, bytes of their scales) in a safetensors file."""
    main = scales = 0
    with safe_open(str(path), "pt") as fh:
        for key in fh.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            tensor = fh.get_tensor(key)
            nbytes = tensor.numel() * tensor.element_size()
            if key.endswith(".scale"):
                scales += nbytes
            else:
                main += nbytes
    return main, scales


def test_4bit_adapter_file_is_a_fraction_of_the_float_one(compared):
    lora, a4 = compared["runs"]["lora"], compared["runs"]["qlora-a4"]
    float_bytes, _ = _adapter_matrix_bytes(
        Path(lora["run_dir"]) / "adapter" / lora["saved_files"][0]
    )
    code_bytes, scale_bytes = _adapter_matrix_bytes(
        Path(a4["run_dir"]) / "adapter" / a4["saved_files"][0]
    )
    # 4-bit codes are stored two per byte (adapter_codes): exactly 1/8 of the float32 payload
    # (every width here is even), plus one float32 scale per row (for B, whose rows are only
    # r = 8 wide, that is 4/8 bytes per weight, as much as its codes): 0.201 in all.
    assert code_bytes * 8 == float_bytes
    assert 0.195 < (code_bytes + scale_bytes) / float_bytes < 0.21
    # Whole files: on this tiny model the headers and the float head weigh in (0.21 and 0.39).
    assert a4["saved_payload_bytes"] < 0.25 * lora["saved_payload_bytes"]
    assert a4["saved_bytes"] < 0.45 * lora["saved_bytes"]


# ----------------------------------------------------------------------------- input checks
def test_bad_method_names_list_the_valid_ones(capsys):
    with pytest.raises(CompareError, match=r"unknown method 'qlora-4'; did you mean 'qlora-a4'\?"):
        parse_methods("lora,qlora-4")
    with pytest.raises(
        CompareError, match="valid methods: full, lora, qlora, qlora-a4, int8, dora"
    ):
        parse_methods("sgd")
    with pytest.raises(CompareError, match="--methods is empty"):
        parse_methods(" , ")
    assert cli.main(["compare", "--methods", "lora,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'bogus'" in err and ", ".join(METHODS) in err
    assert parse_methods("LoRA, qlora,lora,QLoRA_a4") == ["lora", "qlora", "qlora-a4"]
    assert parse_methods("all") == list(METHODS)


@pytest.mark.parametrize("text", ["0", "-4", "x", "4.5", "8,0", ",", "true"])
def test_bad_ranks_are_rejected(text, capsys):
    with pytest.raises(CompareError, match="--ranks"):
        parse_ranks(text)
    assert cli.main(["compare", "--ranks", text]) == 2
    assert "--ranks" in capsys.readouterr().err


def test_other_bad_options(capsys):
    assert parse_ranks("16, 4,16") == [16, 4]
    for argv, message in (
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--steps", "many"], "--steps must be a positive integer"),
        (["--full-lr", "fast"], "--full-lr must be a number"),
        (["--methods"], "--methods needs a value"),
        (["--method", "full"], "--training.method is set by loraq compare: use --methods"),
        (["--lora.rank", "4"], "did you mean 'lora.r'"),
    ):
        assert cli.main(["compare", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_options_and_overrides_are_told_apart():
    own, rest = split_options(
        ["--methods=lora", "--lr", "1e-3", "--ranks", "4,8", "--full_lr", "1"]
    )
    assert own == {"methods": "lora", "ranks": "4,8", "full_lr": "1"}
    assert rest == ["--lr", "1e-3"]


def test_rank_sweep_plan():
    runs = plan_runs(["full", "lora", "qlora-a4"], [4, 16])
    assert [r.slug for r in runs] == ["full", "lora-r4", "lora-r16", "qlora-a4-r4", "qlora-a4-r16"]


def test_methods_override_the_configs_quantization(tmp_path, bert_dir):
    cfg = load_config(tiny_config(tmp_path, bert_dir))  # asks for an NF4 base
    lora = run_config(cfg, Run("lora", 4), tmp_path / "a", threads=3, full_lr=None)
    assert lora.lora.quant is None and lora.lora.r == 4 and not lora.lora.use_dora
    assert lora.training.num_threads == 3 and lora.training.eval_every is None
    a4 = run_config(cfg, Run("qlora-a4", 8), tmp_path / "b", threads=1, full_lr=None)
    assert a4.lora.adapter_bits == 4 and a4.lora.quant == "nf4"
    dora = run_config(cfg, Run("dora", 8), tmp_path / "c", threads=1, full_lr=None)
    assert dora.lora.use_dora and dora.lora.quant is None
    full = run_config(cfg, Run("full", None), tmp_path / "d", threads=1, full_lr=1e-4)
    assert full.training.method == "full" and full.training.lr == 1e-4
    assert cfg.lora.quant == "nf4"  # the shared config is left alone


def test_warmup_rule():
    assert [warmup_steps_of(n) for n in (1, 2, 9, 20, 100)] == [0, 1, 1, 4, 10]


def test_a_failing_run_is_reported_and_the_rest_kept(tmp_path, capsys, bert_dir):
    # An adapter target that matches no module: the worker fails inside loraq.apply.
    out = tmp_path / "out"
    argv = ["compare", str(tiny_config(tmp_path, bert_dir)), "--methods", "lora", "--steps", "2"]
    argv += ["--out", str(out), "--lora.targets", "[no_such_module]"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "| lora | 8 | failed: worker exited with code 1" in captured.out
    (run,) = json.loads((out / "compare.json").read_text(encoding="utf-8"))["runs"]
    assert not run["ok"] and "no_such_module" in run["error"]  # the end of worker.log
    assert (out / "compare.md").is_file()


def test_gpu_report_shows_device_memory(tmp_path):
    # No GPU here: a report as a CUDA run would fill it, through the same writers.
    def result(method: str, rank: int | None, gpu: int) -> RunResult:
        return RunResult(
            method=method, rank=rank, slug=Run(method, rank).slug, ok=True, metric="eval_loss",
            trainable_params=10, total_params=100, peak_rss_bytes=2**30, peak_gpu_bytes=gpu,
            train_peak_gpu_bytes=gpu // 2, step_time_s=0.01, tokens_per_s=1e5,
            metric_start=3.0, metric_final=2.0, metric_delta=-1.0,
        )  # fmt: skip

    settings = {"steps": 5, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "full_lr": 1e-4,
                "seed": 0, "model": "m", "task": "causal-lm", "train": "t.jsonl", "eval": None,
                "max_length": 32}  # fmt: skip
    env = {"threads": 16, "device": "cuda:0", "gpu": "NVIDIA H200", "torch": "2", "python": "3",
           "loraq": "0"}  # fmt: skip
    report = CompareReport(
        settings, env, [result("full", None, 3 * 2**30), result("qlora", 8, 2**30)]
    )
    paths = write_outputs(report, tmp_path)
    table = report.table()
    assert "| peak GPU | peak GPU, training |" in table and "| 3.00 GiB | 1.50 GiB |" in table
    assert "| loss ↓ | Δ vs start |" in table and "10.0 ms (1.00×)" in table
    assert "Measured on NVIDIA H200" in paths["md"].read_text(encoding="utf-8")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_state_column_says_it_is_computed(compared):
    # weights+grads+AdamW is frozen + 4 x trained, not a measurement: the table and the
    # column notes must say so.
    header = compared["stdout"].splitlines()[0]
    assert "| weights+grads+AdamW (computed) |" in header
    md = (compared["out"] / "compare.md").read_text(encoding="utf-8")
    assert "*weights+grads+AdamW (computed)*: frozen + 4 x trained, computed" in md
    assert "not measured" in md
    for r in compared["runs"].values():
        assert r["state_bytes"] == r["frozen_bytes"] + 4 * r["trained_bytes"]
