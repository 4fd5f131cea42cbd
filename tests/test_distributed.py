"""loraq.train under torchrun: real ranks (2 CPU processes, gloo) on 127.0.0.1.

Two ranks with batch b must follow the trajectory of one process with batch 2b (the global batch
split deterministically, the loss normalised by the global item count); a SIGTERM on one rank
stops both at the same step with one checkpoint, and resuming from it equals the uninterrupted
run; a rank that raises brings the job down within a timeout instead of hanging it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import loraq
from conftest import tolerance
from loraq.io.tensor_tree import load_tree
from loraq.train import checkpoint as ckpt
from loraq.train import distributed, load_config, train
from loraq.train.config import ConfigError
from stories260k import STORIES
from test_train_support import char_tokenizer, make_tiny_llama

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "dist_worker.py"
#: Seconds a whole torchrun job may take before the test kills it and fails.
JOB_TIMEOUT = 240
STEPS = 4
#: Two ranks vs one process in float32: the gradient all-reduce sums in another order, so each
#: step rounds differently through the model's reductions (widths up to 96), over STEPS steps.
RANKS_TOL = tolerance(torch.float32, 96, depth=STEPS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(loraq.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, str(TESTS), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def run_ranks(*args: str, nproc: int = 2, timeout: float = JOB_TIMEOUT):
    """``torchrun --nproc_per_node nproc ARGS`` on 127.0.0.1; killed (and failed) on timeout."""
    env = job_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "--monitor_interval=0.5",
        *args,
    ]
    return run_job(cmd, env, timeout)


def run_job(cmd: list[str], env: dict[str, str], timeout: float):
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun job hung for {timeout} s:\n{err.decode()[-3000:]}")
    return proc.returncode, out.decode(), err.decode()


def write_run_config(
    folder: Path, model: Path, batch_size: int, name: str, dropout: float = 0.0, **training
) -> Path:
    # Prompts and completions of different lengths: ranks see different token counts, and 10
    # examples in global batches of 4 end each epoch with 2, leaving rank 1 an empty share.
    rows = [
        {"prompt": "q" * (1 + i % 5) + ":", "completion": "ab" * (1 + (i * 7) % 6)}
        for i in range(10)
    ]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    body = {
        "model": {"path": str(model), "task": "causal-lm"},
        "data": {"train": str(data), "max_length": 32},
        # float32 named, not "auto": these runs test the distribution, and "auto" is bf16 on an
        # AVX512-BF16/AMX CPU, where one process and two ranks round differently
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": dropout,
            "quant": "nf4",
            "compute_dtype": "float32",
        },  # fmt: skip
        "training": {
            "max_steps": STEPS,
            "batch_size": batch_size,
            "grad_accum": 2,
            "lr": 1e-2,
            "warmup_steps": 1,
            "eval_before": False,
            "save_every": 2,
            "output_dir": str(folder / name),
            "progress": False,
            "num_threads": 1,
            **training,
        },
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_run(got: Path, want: Path, tol: float, weight_tol: float | None = None) -> None:
    """Same loss at every step (``tol``) and the same adapter (``weight_tol``, default ``tol``)."""
    weight_tol = tol if weight_tol is None else weight_tol
    got_losses, want_losses = losses(got), losses(want)
    assert sorted(got_losses) == list(range(1, STEPS + 1))
    for step, value in want_losses.items():
        assert got_losses[step] == pytest.approx(value, rel=tol, abs=tol), step
    got_w, want_w = adapter(got), adapter(want)
    assert set(got_w) == set(want_w)
    for key, tensor in want_w.items():
        torch.testing.assert_close(got_w[key], tensor, rtol=weight_tol, atol=weight_tol, msg=key)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Llama (no dropout of its own)."""
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The tiny Llama; one process with batch 4; ``torchrun -m loraq train`` 2 x batch 2."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model
    single = write_run_config(root, model, batch_size=4, name="single")
    train(load_config(single), log=lambda s: None)
    ddp = write_run_config(root, model, batch_size=2, name="ddp")
    code, out, err = run_ranks("-m", "loraq", "train", str(ddp))
    assert code == 0, err[-3000:]
    return {
        "root": root,
        "model": model,
        "single": root / "single",
        "ddp": root / "ddp",
        "out": out,
    }


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(runs):
    assert_same_run(runs["ddp"], runs["single"], tol=RANKS_TOL)
    # Rank 0 alone writes: one record per step, one summary, one config, both checkpoints.
    assert runs["out"].count("loraq train summary") == 1
    assert "distributed: ddp over 2 ranks" in runs["out"]
    checkpoints = sorted(p.name for p in (runs["ddp"] / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]
    rngs = ckpt.read_rank_rng(runs["ddp"] / "checkpoints" / "step-000002")
    assert len(rngs) == 2 and all("torch" in r for r in rngs)
    # Each rank reseeds from (seed, rank) before training: different streams, same model.
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert ckpt.read_state(runs["ddp"] / "checkpoints" / "step-000002").world_size == 2
    assert ckpt.read_state(runs["single"] / "checkpoints" / "step-000002").world_size == 1
    assert (runs["ddp"] / "loss.png").is_file()


def test_sigterm_on_one_rank_stops_all_and_resume_equals_uninterrupted(runs):
    root = runs["root"]
    config = write_run_config(root, runs["model"], batch_size=2, name="stopped")
    code, out, err = run_ranks(
        str(WORKER), str(config), "--fault", "sigterm", "--fault-rank", "1", "--fault-step", "1"
    )
    assert code == 0, err[-3000:]
    # The signal arrived on rank 1 during step 1; both ranks agree to stop after that step.
    assert "rank 0 stopped at step 1" in out and "rank 1 stopped at step 1" in out
    assert "SIGTERM: saving a checkpoint" in out + err
    run = root / "stopped"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert sorted(losses(run)) == [1]

    # `loraq train --nproc 2` launches the ranks itself (torchrun's launcher, in-process).
    cmd = [sys.executable, "-m", "loraq", "train", str(config), "--resume", "--nproc", "2"]
    code, out, err = run_job(cmd, job_env(), JOB_TIMEOUT)
    assert code == 0, err[-3000:]
    assert "resumed from" in out
    assert_same_run(run, runs["ddp"], tol=1e-6)


def test_a_rank_that_raises_stops_every_rank(runs):
    config = write_run_config(runs["root"], runs["model"], batch_size=2, name="crash")
    code, out, err = run_ranks(
        str(WORKER), str(config), "--fault", "raise", "--fault-rank", "1", "--fault-step", "1",
        "--distributed_timeout", "60", timeout=150,
    )  # fmt: skip
    assert code != 0
    assert "injected failure on rank 1 at step 1" in err
    assert not (runs["root"] / "crash" / "adapter").exists()


def test_strategy_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.resolve_strategy("auto", launched=False) == "none"
    with pytest.raises(ConfigError, match="not started by torchrun"):
        distributed.resolve_strategy("ddp", launched=False)
    with pytest.raises(ConfigError, match="training.distributed must be one of"):
        distributed.resolve_strategy("zero3", launched=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="started several ranks"):
        distributed.resolve_strategy("none", launched=True)
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        distributed.torchrun_env({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ConfigError, match="outside WORLD_SIZE"):
        distributed.torchrun_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_rank_shares_cover_the_global_batches_in_order():
    examples = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]
    world = [distributed.Dist(rank=r, world_size=2, strategy="ddp") for r in range(2)]
    from loraq.train.data import micro_batches

    streams = [
        micro_batches(examples, 2, 0, 0, rank=d.rank, world_size=d.world_size) for d in world
    ]
    single = micro_batches(examples, 4, 0, 0)
    for _ in range(6):  # two epochs of 3 global batches (4, 4, 2 examples)
        full = next(single)
        shares = [next(s) for s in streams]
        real = [s.batch["input_ids"] for s in shares if s.weight == 1.0]
        assert torch.equal(torch.cat(real), full.batch["input_ids"])
        assert all(s.next_index == full.next_index for s in shares)
        n = full.batch["input_ids"].shape[0]  # one target per example
        assert full.global_items == n and all(s.global_items == n for s in shares)


def base_bytes(out: str) -> dict[int, tuple[int, int]]:
    """``rank R base bytes A -> B`` lines of the worker: {R: (A, B)}."""
    found = re.findall(r"rank (\d+) base bytes (\d+) -> (\d+)", out)
    return {int(r): (int(a), int(b)) for r, a, b in found}


@pytest.fixture(scope="module")
def fsdp_run(runs):
    config = write_run_config(
        runs["root"], runs["model"], batch_size=2, name="fsdp", distributed="fsdp"
    )
    code, out, err = run_ranks(str(WORKER), str(config))
    assert code == 0, err[-3000:]
    return runs["root"] / "fsdp", out


def test_fsdp_shards_the_nf4_base_and_equals_one_process(runs, fsdp_run):
    run, out = fsdp_run
    sizes = base_bytes(out)
    assert sorted(sizes) == [0, 1]
    whole = sizes[0][0]
    assert whole > 0 and all(before == whole for before, _ in sizes.values())
    assert sum(after for _, after in sizes.values()) == whole  # the shards partition the base
    for _, after in sizes.values():
        assert 0.45 < after / whole < 0.55
    assert_same_run(run, runs["single"], tol=RANKS_TOL)
    # The checkpoint has the single-process layout: whole tensors, as DDP's.
    step = "checkpoints/step-000004"
    got = load_tree(run / step / ckpt.RESUME_JSON, run / step / ckpt.RESUME_TENSORS)
    want = load_tree(
        runs["ddp"] / step / ckpt.RESUME_JSON, runs["ddp"] / step / ckpt.RESUME_TENSORS
    )
    got, want = got["optimizer"]["state"], want["optimizer"]["state"]
    assert set(got) == set(want)
    for i, entry in want.items():
        torch.testing.assert_close(got[i]["exp_avg"], entry["exp_avg"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_sigterm_and_resume_equals_uninterrupted(runs, fsdp_run):
    root = runs["root"]
    config = write_run_config(
        root, runs["model"], batch_size=2, name="fsdp-stopped", distributed="fsdp"
    )
    code, out, err = run_ranks(
        str(WORKER), str(config), "--fault", "sigterm", "--fault-rank", "0", "--fault-step", "2"
    )
    assert code == 0, err[-3000:]
    assert "rank 1 stopped at step 2" in out
    code, out, err = run_ranks(str(WORKER), str(config), "--resume")
    assert code == 0, err[-3000:]
    assert_same_run(root / "fsdp-stopped", fsdp_run[0], tol=1e-6)


def test_exposing_a_quantized_record_for_sharding_keeps_its_behaviour():
    from loraq.layers.quantized import Linear4bit, Linear8bit

    for make in (Linear4bit.from_linear, Linear8bit.from_linear):
        layer = make(torch.nn.Linear(64, 32))
        x = torch.randn(3, 64)
        want_y, want_sd = layer(x), layer.state_dict()
        layer.expose_for_sharding()
        names = {n for n, p in layer.named_parameters() if n.startswith("weight_")}
        assert names and not any(p.requires_grad for n, p in layer.named_parameters() if n in names)
        assert torch.equal(layer(x), want_y)
        got_sd = layer.state_dict()  # bitsandbytes' keys only, as before
        assert list(got_sd) == list(want_sd)
        assert all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
        layer.to(torch.bfloat16)  # codes and scales keep their dtypes
        assert {p.dtype for n, p in layer.named_parameters() if n in names} <= {
            torch.uint8,
            torch.float32,
        }
        fresh = make(torch.nn.Linear(64, 32))
        fresh.expose_for_sharding()
        fresh.load_state_dict(want_sd)  # strict: the exposed names are not missing keys
        assert torch.equal(fresh(x), want_y)


def stories_folder(folder: Path) -> Path:
    """stories260K as a transformers folder (+ the char tokenizer: the test trains on token ids,
    it does not need the model's own vocabulary)."""
    from stories260k import load_stories260k

    load_stories260k(STORIES).save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260K absent")
def test_fsdp_on_stories260k_equals_one_process_and_halves_the_base(tmp_path):
    model = stories_folder(tmp_path / "stories260K")
    single = write_run_config(tmp_path, model, batch_size=4, name="single", save_every=None)
    train(load_config(single), log=lambda s: None)
    config = write_run_config(
        tmp_path, model, batch_size=2, name="fsdp", distributed="fsdp", save_every=None
    )
    code, out, err = run_ranks(str(WORKER), str(config))
    assert code == 0, err[-3000:]
    sizes = base_bytes(out)
    whole = sizes[0][0]
    assert sum(after for _, after in sizes.values()) == whole
    assert all(0.45 < after / whole < 0.55 for _, after in sizes.values())
    # Adam divides by the root of each element's squared-gradient average, so float rounding in
    # a near-zero gradient moves that element by up to lr-sized steps: a few of the thousands of
    # weights differ by ~2e-5 while every loss agrees to 1e-5.
    assert_same_run(tmp_path / "fsdp", tmp_path / "single", tol=1e-5, weight_tol=1e-4)


# ----------------------------------------------------------------------------- world size
def fake_checkpoint(run: Path, step: int, world_size: int | None, rank_rng: int = 0) -> Path:
    """A checkpoint of a tiny model written by ``world_size`` ranks (None: a checkpoint of an
    older version, which did not record it; ``rank_rng`` per-rank RNG states then tell)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = ckpt.TrainState(step=step, world_size=world_size)
    rngs = [ckpt.rng_state() for _ in range(rank_rng)] or None
    return ckpt.save_checkpoint(run / "checkpoints", model, optimizer, scheduler, state, None, rngs)


@pytest.mark.parametrize(
    ("written", "rank_rng", "nproc", "names"),
    [
        (2, 0, None, ("2 ranks", "1 process")),  # 2 ranks -> one process
        (2, 0, 3, ("2 ranks", "3 ranks")),  # 2 ranks -> 3 (refused by the launcher)
        (1, 0, 2, ("1 process", "2 ranks")),  # one process -> 2 ranks
        (None, 2, None, ("2 ranks", "1 process")),  # an older checkpoint: its rank RNG states
    ],
)
def test_resume_under_another_world_size_is_refused_in_one_line(
    tmp_path, tiny_model, capsys, written, rank_rng, nproc, names
):
    from loraq.cli import main

    config = write_run_config(tmp_path, tiny_model, batch_size=2, name="run", max_steps=400)
    found = fake_checkpoint(tmp_path / "run", 3, written, rank_rng)
    args = ["train", str(config), "--resume"] + ([f"--nproc={nproc}"] if nproc else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraq train: error: checkpoint"), err
    assert all(name in err[0] for name in names) and str(found) in err[0]
    # Nothing ran: no rank was started, no metrics written.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_world_size_of_a_checkpoint(tmp_path):
    assert ckpt.world_size_mismatch(fake_checkpoint(tmp_path / "a", 1, 2), 2) is None
    assert ckpt.recorded_world_size(fake_checkpoint(tmp_path / "b", 1, None)) == 1
    assert ckpt.recorded_world_size(fake_checkpoint(tmp_path / "c", 1, None, rank_rng=3)) == 3
    assert ckpt.world_size_mismatch(tmp_path / "not-a-checkpoint", 2) is None
    old = fake_checkpoint(tmp_path / "d", 1, None)
    (old / ckpt.RESUME_JSON).unlink()  # loading it says what is wrong, not this check
    assert ckpt.world_size_mismatch(old, 2) is None


def test_rank_seeds_are_distinct_and_repeatable():
    seeds = {distributed.rank_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(seeds) == 32
    assert distributed.rank_seed(7, 1) == distributed.rank_seed(7, 1)
    torch.manual_seed(distributed.rank_seed(0, 1))  # within torch's seed range


# ----------------------------------------------------------------------------- dropout
#: Dropout of the tiny Llama's attention (the model's own) and of its LoRA layers.
DROPOUT = 0.1


def with_model_dropout(model: Path, folder: Path, p: float) -> Path:
    """A copy of the model folder whose config turns on the model's own (attention) dropout."""
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["attention_dropout"] = p
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def rng_digests(out: str) -> dict[tuple[int, int], str]:
    """``rank R step S rng HEX`` lines of the worker: {(R, S): HEX}."""
    found = re.findall(r"rank (\d+) step (\d+) rng ([0-9a-f]+)", out)
    return {(int(r), int(s)): h for r, s, h in found}


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory, tiny_model):
    """With dropout: one process with batch 4, 2 ranks x batch 2 (the worker, reporting every
    rank's RNG state after each step)."""
    root = tmp_path_factory.mktemp("dropout")
    model = with_model_dropout(tiny_model, root / "llama", DROPOUT)
    single = write_run_config(root, model, batch_size=4, name="single", dropout=DROPOUT)
    train(load_config(single), log=lambda s: None)
    ddp = write_run_config(root, model, batch_size=2, name="ddp", dropout=DROPOUT)
    code, out, err = run_ranks(str(WORKER), str(ddp))
    assert code == 0, err[-3000:]
    return {
        "root": root,
        "model": model,
        "single": root / "single",
        "ddp": root / "ddp",
        "out": out,
    }


def test_with_dropout_each_rank_draws_its_own_masks(dropout_runs):
    digests = rng_digests(dropout_runs["out"])
    assert sorted(digests) == [(r, s) for r in range(2) for s in range(1, STEPS + 1)]
    for step in range(1, STEPS + 1):  # not copies of one stream, from the first step on
        assert digests[(0, step)] != digests[(1, step)], step
    assert len({digests[(0, s)] for s in range(1, STEPS + 1)}) == STEPS  # masks were drawn


def dropout_noise(config: Path, draws: int = 16) -> float:
    """Relative standard deviation of the first micro-batch's loss over ``draws`` dropout masks,
    at the run's initial weights: the noise by which two runs with other masks may differ."""
    from loraq.train.loop import setup

    session = setup(load_config(config, ["--overwrite"]), log=lambda s: None)
    session.metrics.close()
    batch = next(session.stream).batch
    values = []
    with torch.no_grad():
        for seed in range(draws):
            torch.manual_seed(seed)
            values.append(session.model(**batch).loss.item())
    return statistics.stdev(values) / statistics.mean(values)


def test_with_dropout_ranks_follow_one_process_within_noise(dropout_runs):
    """Two ranks draw other masks than one process, so the runs agree only up to dropout's
    noise: the same loss curve within it, not to float rounding."""
    got, want = losses(dropout_runs["ddp"]), losses(dropout_runs["single"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    noise = dropout_noise(dropout_runs["root"] / "single.yaml")
    # Each run's step loss carries that noise (less: it averages grad_accum micro-batches);
    # the difference of two independent runs sqrt(2) times it; 4 standard deviations.
    bound = 4 * math.sqrt(2) * noise
    gaps = [abs(got[s] - want[s]) / want[s] for s in want]
    assert max(gaps) < bound, (gaps, bound)
    assert max(gaps) > RANKS_TOL  # other masks indeed: not equal to rounding


def test_with_dropout_sigterm_and_resume_reproduce_exactly(dropout_runs):
    root = dropout_runs["root"]
    config = write_run_config(
        root, dropout_runs["model"], batch_size=2, name="stopped", dropout=DROPOUT
    )
    code, out, err = run_ranks(
        str(WORKER), str(config), "--fault", "sigterm", "--fault-rank", "1", "--fault-step", "1"
    )
    assert code == 0, err[-3000:]
    code, out, err = run_ranks(str(WORKER), str(config), "--resume")
    assert code == 0, err[-3000:]
    assert_same_run(root / "stopped", dropout_runs["ddp"], tol=1e-6)
    # every rank continues its own stream where the checkpoint left it
    want = rng_digests(dropout_runs["out"])
    got = rng_digests(out)
    assert got == {k: v for k, v in want.items() if k[1] > 1}


# ----------------------------------------------------------------------------- FSDP, real job
def test_fsdp_trains_checkpoints_and_resumes_the_builtin_default_job(tmp_path):
    """The built-in job (MiniLM, its classifier head a modules_to_save, its own dropout) under
    FSDP on 2 ranks: the adapter and checkpoints are written after an eval, and resuming from
    a checkpoint reproduces the rest of the run."""
    eval_rows = (TESTS.parent / "examples" / "sentiment_eval.tsv").read_text(encoding="utf-8")
    small_eval = tmp_path / "eval.tsv"  # the eval's forward is what left the head gathered
    small_eval.write_text("".join(eval_rows.splitlines(keepends=True)[:17]), encoding="utf-8")
    common = [
        "-m", "loraq", "train", "--training.distributed", "fsdp", "--max_steps", "2",
        "--batch_size", "2", "--save_every", "1", "--eval_before", "false",
        "--data.eval", str(small_eval), "--compute_dtype", "float32", "--progress", "false",
        "--num_threads", "1",
    ]  # fmt: skip
    code, out, err = run_ranks(*common, "--output_dir", str(tmp_path / "full"))
    assert code == 0, err[-3000:]
    run = tmp_path / "full"
    saved = adapter(run)
    head = sorted(k for k in saved if ".classifier." in k)
    assert head and all(saved[k].shape[0] == 2 for k in head)  # whole: 2 labels, not a shard
    trainable = load_file(str(run / "checkpoints" / "step-000002" / "trainable.safetensors"))
    weight = trainable["classifier.modules_to_save.default.weight"]
    assert weight.shape == (2, 384)
    # Resume from step 1 in another folder: step 2 again, the same adapter.
    resumed = tmp_path / "resumed"
    code, out, err = run_ranks(
        *common, "--output_dir", str(resumed), "--resume", str(run / "checkpoints" / "step-000001")
    )
    assert code == 0, err[-3000:]
    assert "resumed from" in out
    assert losses(resumed)[2] == pytest.approx(losses(run)[2], rel=1e-6)
    again = adapter(resumed)
    assert set(again) == set(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-6, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------- signals, --nproc
def start_launcher(config: Path) -> tuple[subprocess.Popen, list[int]]:
    """``loraq train CONFIG --nproc 2`` in its own process group, once it has done a step;
    returns the process and its ranks' pids."""
    cmd = [sys.executable, "-m", "loraq", "train", str(config), "--nproc", "2"]
    proc = subprocess.Popen(
        cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    metrics = config.parent / config.stem / "metrics.jsonl"
    for _ in range(int(JOB_TIMEOUT / 0.2)):
        if metrics.is_file() and '"loss"' in metrics.read_text(encoding="utf-8"):
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()[1].decode()[-3000:]}")
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("no step within the job timeout")
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return proc, [int(pid) for pid in ranks.stdout.split()]


def finish_job(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the launcher did not stop")
    return proc.returncode, out.decode(), err.decode()


def running(pids: list[int], wait_s: float) -> list[int]:
    """The pids still running after up to ``wait_s`` seconds."""
    deadline = time.time() + wait_s
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not zombie(pid)]
    return alive


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stopping_nproc_exits_130_with_one_line(tmp_path, tiny_model, how):
    config = write_run_config(
        tmp_path, tiny_model, batch_size=2, name="run", max_steps=10_000, save_every=None
    )
    proc, ranks = start_launcher(config)
    assert len(ranks) == 2
    if how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)  # the launcher alone
    else:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: launcher and ranks
    code, out, err = finish_job(proc)
    assert code == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    newest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest is not None
    assert lines[0] == (
        f"loraq train: interrupted; newest checkpoint {newest} (continue with --resume)"
    )
    assert running(ranks, 5) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_launcher_stops_its_ranks(tmp_path, tiny_model):
    config = write_run_config(
        tmp_path, tiny_model, batch_size=2, name="run", max_steps=10_000, save_every=None
    )
    proc, ranks = start_launcher(config)
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)
    finish_job(proc)
    # The kernel sends each orphaned rank SIGTERM: they agree to stop and checkpoint.
    assert running(ranks, 60) == []
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
