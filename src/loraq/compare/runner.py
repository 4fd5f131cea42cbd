"""Running a comparison: each run in its own worker process, then the report.

:func:`compare` plans the runs, builds every run's config, launches one worker per run
(:func:`launch`, ``python -m loraq.compare.worker``) and rewrites the report after each.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraq.compare.methods import (
    DEFAULT_OUT,
    DEFAULT_STEPS,
    FULL_LR_FACTOR,
    LOG_NAME,
    METHODS,
    RESULT_NAME,
    SPEC_NAME,
    CompareError,
    Run,
    default_methods,
    parse_methods,
    parse_ranks,
    plan_runs,
    preference_objective,
    run_config,
)
from loraq.compare.plot import plot_report
from loraq.compare.report import CompareReport, RunResult, ms_text, size_text, write_report
from loraq.core.probes import auto_threads, available_cpus
from loraq.train.config import TrainConfig


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
            [sys.executable, "-m", "loraq.compare.worker", str(spec_path)],
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

    from loraq.core.version import __version__
    from loraq.train.modeling import resolve_device

    resolved = resolve_device(device)
    env: dict[str, Any] = {
        "loraq": __version__,
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


def compare(
    cfg: TrainConfig,
    methods: Sequence[str] | None = None,
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
        methods: names from :data:`METHODS` (None: :func:`default_methods`; with a ``dpo`` /
            ``orpo`` config every adapter method trains by that objective).
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

    methods = parse_methods(list(methods if methods is not None else default_methods(cfg)))
    ranks = parse_ranks(list(ranks) if ranks is not None else [cfg.lora.r])
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
    report = CompareReport(
        settings={**run_settings(cfg, methods, ranks, steps, full_lr), **(settings or {})},
        environment=environment(threads, cfg.training.device),
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
                speed = f"{ms_text(result.step_time_s)}/step"
                bar.set_postfix_str(f"{run.slug}: {speed}, {size_text(result.peak_rss_bytes)}")
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


def run_settings(
    cfg: TrainConfig, methods: list[str], ranks: list[int], steps: int, full_lr: float
) -> dict[str, Any]:
    """What every run of a comparison shares, for the report's ``settings``."""
    t = cfg.training
    return {
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
            k: v
            for k, v in cfg.lora.to_dict().items()
            if k not in ("quant", "use_dora", "adapter_bits")
        },
        "method_help": {m: METHODS[m].help for m in methods},
        "objective": preference_objective(cfg),
        "beta": t.beta,
    }


def write_outputs(report: CompareReport, out: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.md`` and (when ``plot``) ``compare.png`` into ``out``."""
    paths = write_report(report, out)
    if plot:
        png = plot_report(report, Path(out) / "compare.png")
        if png is not None:
            paths["png"] = png
    return paths
