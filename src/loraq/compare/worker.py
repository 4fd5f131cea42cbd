"""One ``loraq compare`` run, alone in its own process::

    python -m loraq.compare.worker RUN_DIR/spec.json

A fresh process per run keeps the memory high-water marks apart: the peak is the kernel's
``VmHWM``, which ``exec`` resets (unlike ``ru_maxrss``, which a child inherits from its parent).
The worker trains as the spec says and writes ``result.json`` next to it.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from loraq.compare.methods import RESULT_NAME, Run
from loraq.compare.report import PREFERENCE_METRIC, RunResult
from loraq.core.probes import peak_rss_bytes, read_proc_status, reset_peak_rss

if TYPE_CHECKING:
    from loraq.train.config import TrainConfig
    from loraq.train.result import TrainResult


def warmup_steps_of(n: int) -> int:
    """Steps left out of the step-time median: the first fifth (1 to 10 steps), none if n < 2.

    The first steps pay for lazy allocations, allocator growth and cache warm-up.
    """
    return 0 if n < 2 else max(1, min(10, n // 5))


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


def run_worker(spec_path: str | Path) -> RunResult:
    """Train one run in this process as its spec says and write ``result.json`` next to it.

    Meant for a fresh process (``python -m loraq.compare.worker SPEC``), so that the memory
    high-water mark is this run's alone.
    """
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    run = Run(spec["method"], spec["rank"])
    folder = Path(spec["run_dir"])
    res = RunResult(method=run.method, rank=run.rank, slug=run.slug, run_dir=str(folder))
    import torch  # (part of the baseline: what every run pays before its model)
    import transformers  # noqa: F401

    from loraq.train.config import from_dict
    from loraq.train.loop import train
    from loraq.train.modeling import resolve_device

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
    record_sizes(res, out, folder)
    record_speed_and_quality(res, out, compared_metric(cfg))
    (folder / RESULT_NAME).write_text(json.dumps(asdict(res), indent=1), encoding="utf-8")
    return res


def compared_metric(cfg: TrainConfig) -> str:
    """The eval metric the report compares: the held-out pairs' reward accuracy for preference
    runs (their eval loss depends on beta and the objective), else the task's main metric."""
    from loraq.train.evaluation import main_metric
    from loraq.train.schema import PREFERENCE_METHODS

    if cfg.training.method in PREFERENCE_METHODS:
        return PREFERENCE_METRIC
    return main_metric(cfg.model.task)[0]


def record_sizes(res: RunResult, out: TrainResult, folder: Path) -> None:
    """Parameters, weight bytes (frozen, trained; the computed training state) and the saved
    files' sizes of a finished run."""
    res.steps, res.losses = out.steps, out.losses
    res.trainable_params, res.total_params = out.trainable_params, out.total_params
    parts = dict(out.weight_parts)
    if res.method == "full" or not parts:
        res.frozen_bytes, res.trained_bytes = 0, out.weight_bytes
        parts = {"all": out.weight_bytes}
    else:
        res.frozen_bytes = parts.get("base_dense", 0) + parts.get("base_quantized", 0)
        res.trained_bytes = parts.get("adapters", 0) + parts.get("modules_to_save", 0)
    res.weight_parts = parts
    # Computed, not measured: weights + gradients + AdamW's two moments of what trains.
    res.state_bytes = res.frozen_bytes + 4 * res.trained_bytes
    saved = folder / ("model" if res.method == "full" else "adapter")
    files = sorted(saved.glob("*.safetensors"))
    res.saved_files = [f.name for f in files]
    res.saved_bytes = sum(f.stat().st_size for f in files)
    res.saved_payload_bytes = sum(safetensors_payload(f) for f in files)


def record_speed_and_quality(res: RunResult, out: TrainResult, metric: str) -> None:
    """Step times (median after warm-up), tokens/s and the eval metric before and after."""
    res.step_times_s, res.step_tokens = list(out.step_times), list(out.step_tokens)
    res.warmup_steps = warmup_steps_of(len(res.step_times_s))
    timed = res.step_times_s[res.warmup_steps :]
    if timed:
        res.step_time_s = statistics.median(timed)
        res.tokens_per_s = sum(res.step_tokens[res.warmup_steps :]) / sum(timed)

    res.metric = metric
    res.eval_before, res.eval_after = dict(out.eval_before), dict(out.eval_after)
    res.metric_start = out.eval_before.get(res.metric)
    res.metric_final = out.eval_after.get(res.metric)
    if res.metric_start is not None and res.metric_final is not None:
        res.metric_delta = res.metric_final - res.metric_start
    res.wall_s = out.wall_time_s
    res.ok = not out.interrupted
    if out.interrupted:
        res.error = "interrupted"


def main(argv: list[str] | None = None) -> int:
    """``python -m loraq.compare.worker SPEC.json``: run one worker; exit code 0 when done."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m loraq.compare.worker SPEC.json", file=sys.stderr)
        return 2
    run_worker(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
