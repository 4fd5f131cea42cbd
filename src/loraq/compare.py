"""``loraq compare``: full fine-tuning vs LoRA vs QLoRA vs quantized adapters, measured.

The comparative analysis of LoRA and QLoRA (complexity, memory, compute, parameter savings) as a
measurement anyone can rerun on their own model and data::

    loraq compare                                    # the built-in default (MiniLM, sentiment)
    loraq compare my.yaml --methods full,lora,qlora --ranks 4,8,16 --steps 50 --lr 1e-3

Every run uses the same model, data, seed, token budget (steps x batch size, identical batches)
and evaluation; only the method (and rank) changes. Each run is a separate Python process
(``python -m loraq.compare --worker SPEC.json``) so that peak memories do not mix: the peak is
the kernel's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``), which
``exec`` resets, unlike ``ru_maxrss``, which a child inherits from its parent.

Measured per run: trainable parameters; bytes of the frozen and the trained weights and of the
training state (weights + gradients + AdamW's two moments); the size on disk of the saved weights
(the adapter file, or the whole model for ``full``); peak memory; median step time after warm-up
and tokens/s; the eval metric before and after training. Written to ``OUT/compare.md``,
``OUT/compare.json`` (every number, per-step times, the environment) and ``OUT/compare.png``;
each run's own folder (adapter, metrics, log) is ``OUT/runs/<method>-r<rank>/``.

Library use::

    from loraq.compare import compare, write_outputs
    from loraq.train.config import load_config
    report = compare(load_config(), methods=["lora", "qlora"], steps=10, out="runs/cmp")
    print(report.table())
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraq.train.config import ConfigError, TrainConfig, load_config, parse_overrides

#: Optimizer steps per run when neither ``--steps`` nor ``--training.max_steps`` is given (the
#: config's ``epochs`` do not apply: every run gets exactly this budget). With the built-in
#: default all six methods take about 2.5 minutes on 2 busy CPU cores (one torch thread), where
#: ``loraq train``'s 40 steps alone take 40 s; the whole must stay under 10 minutes.
DEFAULT_STEPS = 20
#: ``full`` runs at this fraction of the config's lr unless ``--full-lr`` is given: adapter
#: learning rates are about 10x full fine-tuning's (the built-in default's 2e-3 makes full
#: fine-tuning of MiniLM diverge to chance accuracy; 2e-4 reaches 0.99).
FULL_LR_FACTOR = 0.1
#: Where the report and the runs go unless ``--out`` says otherwise.
DEFAULT_OUT = "runs/compare"
#: Files a worker writes into its run folder.
SPEC_NAME, RESULT_NAME, LOG_NAME = "spec.json", "result.json", "worker.log"
#: Training keys that compare sets itself (an override of them would be ignored or misleading).
RESERVED_KEYS = {
    "training.method": "use --methods",
    "training.resume": "every compare run starts afresh",
    "training.output_dir": "use --out",
}


class CompareError(ConfigError):
    """Bad input to ``loraq compare`` (a method name, a rank, an option); the message says which."""


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One way to fine-tune.

    Attributes:
        name: what ``--methods`` calls it.
        help: one line for ``--help`` and the report.
        lora: the ``lora`` settings it forces over the config's (None: full fine-tuning, where
            the ``lora`` section is not used and every weight trains).
    """

    name: str
    help: str
    lora: dict[str, Any] | None

    @property
    def uses_rank(self) -> bool:
        """True for adapter methods (one run per rank); full fine-tuning has no rank."""
        return self.lora is not None


# Each adapter method states every quantization / variant field, so the config's own choice
# (the built-in default has quant: nf4) never leaks into a method that should not have it.
_PLAIN = {"quant": None, "use_dora": False, "adapter_bits": None}
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning: every weight trains (float32)", None),
        Method("lora", "LoRA adapters over the float32 base", dict(_PLAIN)),
        Method(
            "qlora",
            "QLoRA: LoRA over an NF4 base with double quantization",
            {**_PLAIN, "quant": "nf4", "double_quant": True},
        ),
        Method(
            "qlora-a4",
            "QLoRA with the adapters themselves on a 4-bit grid (adapter_bits=4)",
            {**_PLAIN, "quant": "nf4", "double_quant": True, "adapter_bits": 4},
        ),
        Method("int8", "LoRA over an 8-bit blockwise base", {**_PLAIN, "quant": "int8"}),
        Method(
            "dora",
            "DoRA (weight-decomposed LoRA) over the float32 base",
            {**_PLAIN, "use_dora": True},
        ),
    )
}
#: What ``loraq compare`` runs when ``--methods`` is not given: all of them.
DEFAULT_METHODS = tuple(METHODS)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"full,lora,qlora"`` (or a list) to validated method names, in order, without repeats.

    ``all`` means every method. Raises :class:`CompareError` naming an unknown method, the
    closest valid one, and the whole list.
    """
    words = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for word in (w.strip().lower().replace("_", "-") for w in words):
        if not word:
            continue
        if word == "all":
            names += [n for n in METHODS if n not in names]
            continue
        if word not in METHODS:
            close = difflib.get_close_matches(word, list(METHODS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise CompareError(
                f"unknown method '{word}'{hint} (valid methods: {', '.join(METHODS)}, or all)"
            )
        if word not in names:
            names.append(word)
    if not names:
        raise CompareError(f"--methods is empty (valid methods: {', '.join(METHODS)}, or all)")
    return names


def parse_ranks(text: str | Sequence[int]) -> list[int]:
    """``"4,8,16"`` (or a list) to distinct positive integer ranks, in order.

    Raises :class:`CompareError` for anything that is not a positive integer.
    """
    words = text.split(",") if isinstance(text, str) else list(text)
    ranks: list[int] = []
    for word in words:
        if isinstance(word, str):
            word = word.strip()
            if not word:
                continue
        ok = isinstance(word, int) and not isinstance(word, bool)
        if isinstance(word, str) and re.fullmatch(r"\+?\d+", word):
            word, ok = int(word), True
        if not ok or word <= 0:
            raise CompareError(f"--ranks: {word!r} is not a positive integer (e.g. --ranks 4,8,16)")
        if word not in ranks:
            ranks.append(word)
    if not ranks:
        raise CompareError("--ranks is empty (e.g. --ranks 4,8,16)")
    return ranks


@dataclass(frozen=True)
class Run:
    """One cell of the comparison: a method, and its rank for adapter methods."""

    method: str
    rank: int | None

    @property
    def slug(self) -> str:
        """Folder name of the run: ``full`` or ``qlora-r8``."""
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"


def plan_runs(methods: Sequence[str], ranks: Sequence[int]) -> list[Run]:
    """Each adapter method x each rank; ``full`` once. In the order given."""
    runs = []
    for name in methods:
        if METHODS[name].uses_rank:
            runs += [Run(name, r) for r in ranks]
        else:
            runs.append(Run(name, None))
    return runs


def run_config(
    cfg: TrainConfig, run: Run, folder: Path, threads: int, full_lr: float | None
) -> TrainConfig:
    """A copy of ``cfg`` for one run: the method's settings, no mid-run eval or checkpoints,
    no progress bar, the shared thread count, and ``folder`` as output."""
    from loraq.train.config import from_flat

    flat: dict[str, Any] = {}
    for section in ("model", "data", "training"):
        flat.update({f"{section}.{k}": v for k, v in asdict(getattr(cfg, section)).items()})
    method = METHODS[run.method]
    lora = dict(cfg.lora)
    if method.lora is None:
        flat["training.method"] = "full"
        if full_lr is not None:
            flat["training.lr"] = full_lr
    else:
        flat["training.method"] = "lora"
        lora.update(method.lora)
        lora["r"] = run.rank
    flat.update({f"lora.{k}": v for k, v in lora.items()})
    flat.update(
        {
            "training.output_dir": str(folder),
            "training.eval_every": None,  # mid-run evals would only add time to the run
            "training.save_every": None,
            "training.eval_before": True,  # the frozen start, for the metric's change
            "training.resume": False,
            "training.progress": False,
            "training.num_threads": threads,
        }
    )
    try:
        return from_flat(flat)
    except ConfigError as err:
        raise CompareError(f"{run.slug}: {err}") from None


# ----------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """Everything measured for one run (all sizes in bytes, times in seconds).

    ``frozen_bytes`` are the weights that do not train (dense and quantized base);
    ``trained_bytes`` those that do (adapters, ``modules_to_save``; for ``full`` every weight);
    ``state_bytes`` = frozen + 4 x trained: weights, gradients and AdamW's two moments, the
    model state a step keeps in memory (activations come on top). ``saved_bytes`` is the size on
    disk of the weight files the run saved (``*.safetensors``: the adapter, or the whole model
    for ``full``), ``saved_payload_bytes`` the tensor data inside them (without headers).
    ``peak_rss_bytes`` is the process's VmHWM over the whole run, ``train_peak_rss_bytes`` the
    high-water mark from the end of step 1 on (the training steps and the final eval, without
    the model load; 0 where it cannot be measured), ``baseline_rss_bytes`` the resident memory
    after importing torch and transformers, before loading the model; ``peak_gpu_bytes`` and
    ``train_peak_gpu_bytes`` the same for CUDA memory (``torch.cuda.max_memory_allocated``; 0
    on CPU). ``step_time_s`` is the median of
    ``step_times_s`` after the first ``warmup_steps``; ``tokens_per_s`` the non-pad tokens of
    those steps over their total time. ``metric_delta`` = ``metric_final - metric_start``.
    """

    method: str
    rank: int | None
    slug: str
    ok: bool = False
    error: str = ""
    run_dir: str = ""
    steps: int = 0
    trainable_params: int = 0
    total_params: int = 0
    frozen_bytes: int = 0
    trained_bytes: int = 0
    state_bytes: int = 0
    weight_parts: dict[str, int] = field(default_factory=dict)
    saved_bytes: int = 0
    saved_payload_bytes: int = 0
    saved_files: list[str] = field(default_factory=list)
    peak_rss_bytes: int = 0
    train_peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0
    peak_rss_source: str = ""
    peak_gpu_bytes: int = 0
    train_peak_gpu_bytes: int = 0
    warmup_steps: int = 0
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    metric: str = ""
    metric_start: float | None = None
    metric_final: float | None = None
    metric_delta: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    wall_s: float = 0.0

    @property
    def label(self) -> str:
        """``qlora r=8`` or ``full``."""
        return self.method if self.rank is None else f"{self.method} r={self.rank}"


@dataclass
class CompareReport:
    """A whole comparison: settings, environment and one :class:`RunResult` per run."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what ``compare.json`` holds)."""
        return {
            "settings": self.settings,
            "environment": self.environment,
            "wall_s": self.wall_s,
            "runs": [{"label": r.label, **asdict(r)} for r in self.runs],
        }

    def table(self) -> str:
        """The markdown table (see :func:`format_table`)."""
        return format_table(self)


def warmup_steps_of(n: int) -> int:
    """Steps left out of the step-time median: the first fifth (1 to 10 steps), none if n < 2.

    The first steps pay for lazy allocations, allocator growth and cache warm-up.
    """
    return 0 if n < 2 else max(1, min(10, n // 5))


def read_proc_status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def reset_peak_rss() -> bool:
    """Restart this process's ``VmHWM`` at its current RSS (Linux >= 4.0: ``clear_refs`` 5).

    Memory that was freed but that the C allocator still holds (such as the float weights a
    quantized base replaced) is handed back first (glibc ``malloc_trim``), since the new mark
    starts at the current RSS, which would otherwise still count it.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mark may start a little high
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def safetensors_payload(path: str | Path) -> int:
    """Bytes of tensor data in a ``.safetensors`` file (its size less the 8-byte length and the
    JSON header)."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    return sum(
        info["data_offsets"][1] - info["data_offsets"][0]
        for key, info in header.items()
        if key != "__metadata__"
    )


# ----------------------------------------------------------------------------- the worker
def run_worker(spec_path: str | Path) -> RunResult:
    """Train one run in this process as its spec says and write ``result.json`` next to it.

    Meant for a fresh process (``python -m loraq.compare --worker SPEC``), so that the memory
    high-water mark is this run's alone.
    """
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    run = Run(spec["method"], spec["rank"])
    folder = Path(spec["run_dir"])
    res = RunResult(method=run.method, rank=run.rank, slug=run.slug, run_dir=str(folder))
    import torch  # (part of the baseline: what every run pays before its model)
    import transformers  # noqa: F401

    from loraq.train.config import from_dict
    from loraq.train.loop import main_metric, resolve_device, train

    res.baseline_rss_bytes = read_proc_status("VmRSS") or 0
    cfg = from_dict(spec["config"])
    res.lr = cfg.training.lr
    device = resolve_device(cfg.training.device)
    setup: dict[str, int | None] = {}

    def after_step(step: int, loss: float) -> None:
        # Setting up can peak above the steps (a big model loaded in float32 before it is
        # quantized): after step 1 (the optimizer state now exists) keep that peak aside and
        # restart the high-water marks, so the training phase gets peaks of its own.
        if step != 1:
            return
        setup["rss"] = read_proc_status("VmHWM")
        if setup["rss"] is not None and not reset_peak_rss():
            setup["rss"] = None
        if device.type == "cuda":
            setup["gpu"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    out = train(cfg, on_step=after_step, log=lambda line: print(line, flush=True))

    peak = read_proc_status("VmHWM")
    if peak is None:  # not Linux: the best we have (may include a parent's peak)
        from loraq.train.loop import peak_rss_bytes

        peak, res.peak_rss_source = peak_rss_bytes(), "ru_maxrss"
    else:
        res.peak_rss_source = "VmHWM"
        if setup.get("rss") is not None:
            res.train_peak_rss_bytes = peak
            peak = max(peak, setup["rss"] or 0)
    res.peak_rss_bytes = peak
    # train() reads the GPU peak at its end, i.e. since the reset after step 1 (if there was one).
    if "gpu" in setup:
        res.train_peak_gpu_bytes = out.peak_gpu_bytes
    res.peak_gpu_bytes = max(out.peak_gpu_bytes, setup.get("gpu") or 0)
    res.steps, res.losses = out.steps, out.losses
    res.trainable_params, res.total_params = out.trainable_params, out.total_params
    parts = dict(out.weight_parts)
    if run.method == "full" or not parts:
        res.frozen_bytes, res.trained_bytes = 0, out.weight_bytes
        parts = {"all": out.weight_bytes}
    else:
        res.frozen_bytes = parts.get("base_dense", 0) + parts.get("base_quantized", 0)
        res.trained_bytes = parts.get("adapters", 0) + parts.get("modules_to_save", 0)
    res.weight_parts = parts
    res.state_bytes = res.frozen_bytes + 4 * res.trained_bytes

    saved = folder / ("model" if run.method == "full" else "adapter")
    files = sorted(saved.glob("*.safetensors"))
    res.saved_files = [f.name for f in files]
    res.saved_bytes = sum(f.stat().st_size for f in files)
    res.saved_payload_bytes = sum(safetensors_payload(f) for f in files)

    res.step_times_s, res.step_tokens = list(out.step_times), list(out.step_tokens)
    res.warmup_steps = warmup_steps_of(len(res.step_times_s))
    timed = res.step_times_s[res.warmup_steps :]
    if timed:
        res.step_time_s = statistics.median(timed)
        res.tokens_per_s = sum(res.step_tokens[res.warmup_steps :]) / sum(timed)

    res.metric = main_metric(cfg.model.task)[0]
    res.eval_before, res.eval_after = dict(out.eval_before), dict(out.eval_after)
    res.metric_start = out.eval_before.get(res.metric)
    res.metric_final = out.eval_after.get(res.metric)
    if res.metric_start is not None and res.metric_final is not None:
        res.metric_delta = res.metric_final - res.metric_start
    res.wall_s = out.wall_time_s
    res.ok = not out.interrupted
    if out.interrupted:
        res.error = "interrupted"
    (folder / RESULT_NAME).write_text(json.dumps(asdict(res), indent=1), encoding="utf-8")
    return res


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def launch(run: Run, cfg: TrainConfig, folder: Path, threads: int) -> RunResult:
    """Run one worker process for ``run`` with ``cfg`` in ``folder``; wait for its result.

    The worker's output goes to ``folder/worker.log``. A failed worker gives a result with
    ``ok=False`` and the end of its log as ``error``, so one bad method does not lose the rest.
    """
    if folder.exists():
        shutil.rmtree(folder)  # no stale adapter or result from an earlier comparison
    folder.mkdir(parents=True)
    spec = {"method": run.method, "rank": run.rank, "run_dir": str(folder), "config": cfg.to_dict()}
    spec_path = folder / SPEC_NAME
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    env = dict(os.environ)
    # One thread count for every run, chosen once by the parent: a worker's own auto_threads()
    # would see the load its predecessor left in the load average and pick fewer threads.
    env.update(
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    log_path = folder / LOG_NAME
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraq.compare", "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or similar: do not leave the worker running
            proc.terminate()
            proc.wait()
            raise
    result_path = folder / RESULT_NAME
    if code == 0 and result_path.is_file():
        data = json.loads(result_path.read_text(encoding="utf-8"))
        return RunResult(**data)
    return RunResult(
        method=run.method,
        rank=run.rank,
        slug=run.slug,
        run_dir=str(folder),
        error=f"worker exited with code {code}; see {log_path}\n{_tail(log_path)}",
    )


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, device: str) -> dict[str, Any]:
    """Versions and hardware the numbers were measured on."""
    import torch
    import transformers

    import loraq
    from loraq.train.loop import available_cpus, resolve_device

    resolved = resolve_device(device)
    env: dict[str, Any] = {
        "loraq": loraq.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus_available": available_cpus(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(resolved),
        "gpu": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else None,
    }
    try:
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    return env


# ----------------------------------------------------------------------------- the comparison
def compare(
    cfg: TrainConfig,
    methods: Sequence[str] = DEFAULT_METHODS,
    ranks: Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    out: str | Path = DEFAULT_OUT,
    full_lr: float | None = None,
    progress: bool = True,
    on_run: Callable[[RunResult], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> CompareReport:
    """Train ``cfg``'s model on its data once per method (x rank), each in its own process.

    Args:
        cfg: the base configuration (model, data, lora settings, training hyper-parameters).
        methods: names from :data:`METHODS`.
        ranks: adapter ranks to sweep (default: the config's ``lora.r``, else 8).
        steps: optimizer steps per run (the same batches for every run).
        out: folder for ``compare.md/json/png`` and ``runs/``.
        full_lr: learning rate for ``full`` (default: ``FULL_LR_FACTOR`` x ``training.lr``).
        progress: show a tqdm bar across the runs (on stderr).
        on_run: called with each finished :class:`RunResult`.
        settings: extra entries for the report's ``settings`` (e.g. the command line).

    Returns the :class:`CompareReport`; ``compare.json`` and ``compare.md`` are rewritten after
    every run (so an interrupted comparison keeps what it measured), ``compare.png`` at the end.
    """
    from tqdm.auto import tqdm

    from loraq.train.loop import auto_threads

    methods = parse_methods(list(methods))
    ranks = parse_ranks(list(ranks) if ranks is not None else [int(cfg.lora.get("r", 8))])
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise CompareError(f"--steps must be a positive integer, got {steps!r}")
    if full_lr is None:
        full_lr = cfg.training.lr * FULL_LR_FACTOR
    elif not full_lr > 0:
        raise CompareError(f"--full-lr must be > 0, got {full_lr}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = cfg.training.num_threads or auto_threads()
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    cfg.training.max_steps = steps
    runs = plan_runs(methods, ranks)
    # Build every run's config before starting any, so that a bad combination fails at once.
    configs = [
        run_config(cfg, r, (out / "runs" / r.slug).resolve(), threads, full_lr) for r in runs
    ]
    t = cfg.training
    report = CompareReport(
        settings={
            "methods": methods,
            "ranks": ranks,
            "steps": steps,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "lr": t.lr,
            "full_lr": full_lr,
            "seed": t.seed,
            "model": cfg.model.path,
            "task": cfg.model.task,
            "train": cfg.data.train,
            "eval": cfg.data.eval,
            "max_length": cfg.data.max_length,
            "lora": {
                k: v for k, v in cfg.lora.items() if k not in ("quant", "use_dora", "adapter_bits")
            },
            "method_help": {m: METHODS[m].help for m in methods},
            **(settings or {}),
        },
        environment=environment(threads, t.device),
    )
    start = time.time()
    bar = tqdm(total=len(runs), desc="compare", unit="run", disable=not progress, file=sys.stderr)
    try:
        for run, run_cfg in zip(runs, configs):
            bar.set_description(f"compare {run.slug}")
            result = launch(run, run_cfg, (out / "runs" / run.slug).resolve(), threads)
            report.runs.append(result)
            report.wall_s = time.time() - start
            write_outputs(report, out, plot=False)
            if result.ok:
                bar.set_postfix_str(
                    f"{run.slug}: {_ms(result.step_time_s)}/step, {_size(result.peak_rss_bytes)}"
                )
            else:
                tqdm.write(f"{run.slug} failed: {result.error}", file=sys.stderr)
            if on_run is not None:
                on_run(result)
            bar.update(1)
    finally:
        bar.close()
        report.wall_s = time.time() - start
        write_outputs(report, out, plot=True)
    return report


# ----------------------------------------------------------------------------- formatting
def _size(n: int | None) -> str:
    if not n:
        return "—" if n is None else "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = 1000 * seconds
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def _num(x: float | None, signed: bool = False) -> str:
    return "—" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")


def _phase_differs(runs: list[RunResult], whole: str, phase: str) -> bool:
    """True when some run's training-phase peak is clearly below its whole-run peak (worth a
    column of its own; on small models the steps set both and the column would repeat)."""
    return any(0 < getattr(r, phase) < 0.98 * getattr(r, whole) for r in runs)


def format_table(report: CompareReport) -> str:
    """One markdown row per run: parameters, bytes, memory, speed, quality.

    Columns for the training-phase peaks appear only where they differ from the whole-run
    peaks; GPU columns only for CUDA runs; ``× full`` only when ``full`` ran.
    """
    runs = [r for r in report.runs if r.ok]
    metric = next((r.metric for r in runs if r.metric), "metric")
    # Which way is better (the metrics of loraq.train.loop.main_metric).
    arrow = {"eval_accuracy": " ↑", "eval_loss": " ↓"}.get(metric, "")
    full = next((r for r in runs if r.method == "full" and r.step_time_s), None)
    gpu = any(r.peak_gpu_bytes for r in runs)

    def step(r: RunResult) -> str:
        text = _ms(r.step_time_s)
        if full and r.step_time_s:
            text += f" ({r.step_time_s / full.step_time_s:.2f}×)"
        return text

    columns: list[tuple[str, Callable[[RunResult], str]]] = [
        ("method", lambda r: r.method),
        ("r", lambda r: "—" if r.rank is None else str(r.rank)),
        (
            "trainable params",
            lambda r: (
                f"{r.trainable_params:,} ({100 * r.trainable_params / max(r.total_params, 1):.2f}%)"
            ),
        ),
        ("frozen weights", lambda r: _size(r.frozen_bytes)),
        ("trained weights", lambda r: _size(r.trained_bytes)),
        ("weights+grads+AdamW", lambda r: _size(r.state_bytes)),
        ("saved file", lambda r: _size(r.saved_bytes)),
        ("peak RSS", lambda r: _size(r.peak_rss_bytes)),
    ]
    if _phase_differs(runs, "peak_rss_bytes", "train_peak_rss_bytes"):
        columns.append(("peak RSS, training", lambda r: _size(r.train_peak_rss_bytes or None)))
    if gpu:
        columns.append(("peak GPU", lambda r: _size(r.peak_gpu_bytes)))
        if _phase_differs(runs, "peak_gpu_bytes", "train_peak_gpu_bytes"):
            columns.append(("peak GPU, training", lambda r: _size(r.train_peak_gpu_bytes or None)))
    columns += [
        ("step time" + (" (× full)" if full else ""), step),
        ("tokens/s", lambda r: "—" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"),
        (metric.removeprefix("eval_") + arrow, lambda r: _num(r.metric_final)),
        ("Δ vs start", lambda r: _num(r.metric_delta, signed=True)),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in report.runs:
        if r.ok:
            cells = [fn(r) for _, fn in columns]
        else:
            first = r.error.splitlines()[0] if r.error else "failed"
            cells = [r.method, "—" if r.rank is None else str(r.rank), f"failed: {first}"]
            cells += [""] * (len(columns) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(report: CompareReport) -> str:
    """``compare.md``: what ran, where, the table, and what each column means."""
    s, e = report.settings, report.environment
    where = e.get("gpu") or e.get("cpu", "")
    lines = [
        "# loraq compare",
        "",
        f"Command: `{s['command']}`" if s.get("command") else "",
        "",
        f"Model `{s['model']}` ({s['task']}), train `{Path(str(s['train'])).name}`, "
        f"eval `{Path(str(s['eval'])).name if s.get('eval') else '—'}`; {s['steps']} steps x "
        f"{s['batch_size'] * s['grad_accum']} examples (max_length {s['max_length']}), "
        f"lr {s['lr']:g}"
        + (f" (full: {s['full_lr']:g})" if "full" in s.get("methods", ["full"]) else "")
        + f", seed {s['seed']}.",
        f"Measured on {where}, {e['threads']} thread(s) on device {e['device']}; torch {e['torch']}, "
        f"python {e['python']}, loraq {e['loraq']}; total {report.wall_s:.0f} s.",
        "",
        report.table(),
        "",
        "Columns: *frozen / trained weights*: bytes of the weights that stay fixed (the base, "
        "quantized or not) and that train (adapters and new heads; everything for full); "
        "*weights+grads+AdamW*: frozen + 4 x trained, the model state a step holds "
        "(activations come on top); *saved file*: size on disk of the saved weights (the "
        "adapter; the whole model for full); *peak RSS*: the high-water mark (VmHWM) of the "
        "run's own process, including about "
        + _size(_median([r.baseline_rss_bytes for r in report.runs if r.ok]))
        + " for Python, torch and transformers and the load of the float model before it is "
        "quantized; *peak RSS, training* (shown where it differs): the same from the end of step 1 "
        "on (the steps and the final eval); *step time*: median after warm-up (× full: relative to full "
        "fine-tuning's); *tokens/s*: non-pad tokens per second of those steps; *Δ vs start*: "
        "change of the eval metric over the same model (same quantization, untrained head or "
        "adapters) before training.",
        "",
        "Methods: " + "; ".join(f"`{m}`: {h}" for m, h in s.get("method_help", {}).items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _median(values: list[int]) -> int | None:
    return int(statistics.median(values)) if values else None


def plot_report(report: CompareReport, path: str | Path) -> Path | None:
    """``compare.png``: peak memory, step time and quality per run, side by side (Agg)."""
    runs = [r for r in report.runs if r.ok]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in runs]
    palette = plt.get_cmap("tab10")
    colors = [palette(list(METHODS).index(r.method) % 10) for r in runs]
    x = range(len(runs))
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(runs) + 6), 4.8))

    # On a GPU the device memory is what limits a run; on a CPU the process's resident memory.
    gpu = any(r.peak_gpu_bytes for r in runs)
    whole = [(r.peak_gpu_bytes if gpu else r.peak_rss_bytes) / 2**20 for r in runs]
    phase = [(r.train_peak_gpu_bytes if gpu else r.train_peak_rss_bytes) / 2**20 for r in runs]
    ax = axes[0]
    ax.bar(x, whole, color=colors, alpha=0.35, label="whole run (with model load)")
    ax.bar(x, [p or w for p, w in zip(phase, whole)], color=colors, label="training (step 2 on)")
    if not gpu:
        ax.bar(
            x,
            [r.baseline_rss_bytes / 2**20 for r in runs],
            color="white",
            alpha=0.45,
            hatch="//",
            label="python + torch + transformers",
        )
    ax.set_ylim(top=1.3 * max(whole))  # room for the legend above the bars
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"peak memory, {'GPU' if gpu else 'RSS'} (MiB)")

    ax = axes[1]
    ax.bar(x, [1000 * (r.step_time_s or 0) for r in runs], color=colors)
    for i, r in enumerate(runs):
        if r.tokens_per_s:
            ax.annotate(
                f"{r.tokens_per_s:,.0f} tok/s",
                (i, 1000 * (r.step_time_s or 0)),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_title("median step time (ms)")

    ax = axes[2]
    metric = runs[0].metric.removeprefix("eval_") or "metric"
    ax.bar(x, [r.metric_final or 0 for r in runs], color=colors, label="after training")
    starts = [(i, r.metric_start) for i, r in enumerate(runs) if r.metric_start is not None]
    if starts:
        ax.scatter(
            [i for i, _ in starts],
            [v for _, v in starts],
            marker="_",
            s=400,
            color="black",
            zorder=3,
            label="before training",
        )
        top = max([r.metric_final or 0 for r in runs] + [v for _, v in starts])
        ax.set_ylim(top=1.12 if metric == "accuracy" else 1.3 * top)
        ax.legend(loc="upper left", fontsize=7)
    ax.set_title(f"eval {metric} after {report.settings.get('steps', '?')} steps")

    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"loraq compare: {Path(str(report.settings.get('model', ''))).name}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: CompareReport, out: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.md`` and (when ``plot``) ``compare.png`` into ``out``."""
    out = Path(out)
    paths = {"json": out / "compare.json", "md": out / "compare.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    paths["md"].write_text(format_markdown(report), encoding="utf-8")
    if plot:
        png = plot_report(report, out / "compare.png")
        if png is not None:
            paths["png"] = png
    return paths


# ----------------------------------------------------------------------------- command line
COMPARE_HELP = f"""\
Fine-tune the same model on the same data once per method and measure each: trainable params,
weight bytes (frozen base and trained part), saved file size, peak memory, step time, tokens/s,
and the eval metric before and after. Each run is its own process (so peaks do not mix).

  loraq compare                               the built-in default (MiniLM sentiment), ~3 min
  loraq compare my.yaml --methods lora,qlora --ranks 4,8,16 --steps 50
  loraq compare --methods full,qlora --lr 1e-3 --full-lr 5e-5

Same model, data, seed, batches and eval for every run; `full` uses --full-lr (default
{FULL_LR_FACTOR:g} x lr: adapters want about 10x the learning rate of full fine-tuning).

Methods (--methods, comma-separated; default: all):
{chr(10).join(f"  {m.name:<10}{m.help}" for m in METHODS.values())}

Any other --key value is an override of the train config (as for `loraq train`). Writes
OUT/compare.md, OUT/compare.json (every number and the environment), OUT/compare.png, and each
run's folder OUT/runs/<method>-r<rank>/ (adapter, metrics.jsonl, worker.log).
"""

#: compare's own options (everything else on the command line is a config override).
_OPTIONS = ("--methods", "--ranks", "--steps", "--out", "--full-lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``loraq compare`` options (for ``--help``; :func:`run_cli` reads them itself, since
    the command passes unknown ``--key value`` words through as config overrides)."""
    p.add_argument("config", nargs="?", help="YAML config file (default: the built-in one)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, or 'all' (default: all: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--ranks", help="adapter ranks to sweep, e.g. 4,8,16 (default: the config's r)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run (default: --training.max_steps if given, else {DEFAULT_STEPS})",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument(
        "--full-lr",
        type=float,
        default=None,
        help=f"learning rate for 'full' (default: {FULL_LR_FACTOR:g} x the config's lr)",
    )


def split_options(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take compare's own ``--option value`` (or ``--option=value``) out of ``words``; return
    them and the remaining words (config overrides)."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        name_ = name.replace("_", "-")
        if name_ in _OPTIONS:
            if not eq:
                if i + 1 >= len(words) or words[i + 1].startswith("--"):
                    raise CompareError(f"{name_} needs a value")
                value = words[i + 1]
                i += 1
            own[name_.lstrip("-").replace("-", "_")] = value
        else:
            rest.append(word)
        i += 1
    return own, rest


def run_cli(args: argparse.Namespace) -> int:
    """``loraq compare``: parse, compare, print the table; exit code 0, or 2 if a run failed."""
    own, words = split_options(list(getattr(args, "overrides", []) or []))
    config = args.config
    if (
        config is None
        and words
        and not words[0].startswith("--")
        and words[0].endswith((".yaml", ".yml"))
    ):
        config = words.pop(0)  # `loraq compare --methods lora my.yaml`
    overrides = parse_overrides(words)
    for key, why in RESERVED_KEYS.items():
        if key in overrides:
            raise CompareError(f"--{key} is set by loraq compare: {why}")
    methods = parse_methods(own.get("methods", ",".join(DEFAULT_METHODS)))
    ranks = parse_ranks(own["ranks"]) if "ranks" in own else None
    steps: Any = own.get("steps", overrides.get("training.max_steps") or DEFAULT_STEPS)
    if isinstance(steps, str):
        if not re.fullmatch(r"\+?\d+", steps.strip()):
            raise CompareError(f"--steps must be a positive integer, got {steps!r}")
        steps = int(steps)
    full_lr = None
    if "full_lr" in own:
        try:
            full_lr = float(own["full_lr"])
        except ValueError:
            raise CompareError(f"--full-lr must be a number, got {own['full_lr']!r}") from None
    cfg = load_config(config, overrides)
    command = "loraq compare " + " ".join(
        [*([str(args.config)] if args.config else []), *(getattr(args, "overrides", []) or [])]
    )
    report = compare(
        cfg,
        methods,
        ranks,
        steps,
        own.get("out", DEFAULT_OUT),
        full_lr=full_lr,
        settings={"command": command.strip()},
    )
    out = Path(own.get("out", DEFAULT_OUT))
    print(report.table())
    print(
        f"\n{len(report.runs)} runs in {report.wall_s:.0f} s; wrote {out / 'compare.md'}, "
        f"{out / 'compare.json'}, {out / 'compare.png'}"
    )
    return 0 if all(r.ok for r in report.runs) else 2


def main(argv: list[str] | None = None) -> int:
    """``python -m loraq.compare --worker SPEC`` runs one worker; anything else is
    ``loraq compare ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        if len(argv) != 2:
            print("usage: python -m loraq.compare --worker SPEC.json", file=sys.stderr)
            return 2
        run_worker(argv[1])
        return 0
    from loraq.cli import main as cli_main

    return cli_main(["compare", *argv])


if __name__ == "__main__":
    sys.exit(main())
