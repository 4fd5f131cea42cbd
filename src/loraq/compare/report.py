"""What ``loraq compare`` measured: :class:`RunResult` per run, :class:`CompareReport` for the
whole, and their markdown table and ``compare.md`` / ``compare.json`` files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraq.train.preference import REWARD_KEYS

#: The table's column for ``state_bytes``: computed from the weight bytes, so it says so.
STATE_COLUMN = "weights+grads+AdamW (computed)"
#: The metric compared for preference runs (``dpo``, ``orpo``): the share of held-out pairs
#: whose chosen answer gets the higher reward; its neighbour, the mean reward margin.
PREFERENCE_METRIC = "eval_" + REWARD_KEYS[3]
MARGIN_METRIC = "eval_" + REWARD_KEYS[2]


@dataclass
class RunResult:
    """Everything measured for one run (all sizes in bytes, times in seconds).

    ``frozen_bytes`` are the weights that do not train (dense and quantized base);
    ``trained_bytes`` those that do (adapters, ``modules_to_save``; for ``full`` every weight);
    ``state_bytes`` = frozen + 4 x trained (computed, not measured): weights, gradients and AdamW's two moments, the
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


def size_text(n: int | None) -> str:
    if not n:
        return "—" if n is None else "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def ms_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = 1000 * seconds
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def num_text(x: float | None, signed: bool = False) -> str:
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
    arrow = {"eval_accuracy": " ↑", "eval_loss": " ↓", PREFERENCE_METRIC: " ↑"}.get(metric, "")
    full = next((r for r in runs if r.method == "full" and r.step_time_s), None)
    gpu = any(r.peak_gpu_bytes for r in runs)

    def step(r: RunResult) -> str:
        text = ms_text(r.step_time_s)
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
        ("frozen weights", lambda r: size_text(r.frozen_bytes)),
        ("trained weights", lambda r: size_text(r.trained_bytes)),
        (STATE_COLUMN, lambda r: size_text(r.state_bytes)),
        ("saved file", lambda r: size_text(r.saved_bytes)),
        ("peak RSS", lambda r: size_text(r.peak_rss_bytes)),
    ]
    if _phase_differs(runs, "peak_rss_bytes", "train_peak_rss_bytes"):
        columns.append(("peak RSS, training", lambda r: size_text(r.train_peak_rss_bytes or None)))
    if gpu:
        columns.append(("peak GPU", lambda r: size_text(r.peak_gpu_bytes)))
        if _phase_differs(runs, "peak_gpu_bytes", "train_peak_gpu_bytes"):
            columns.append(
                ("peak GPU, training", lambda r: size_text(r.train_peak_gpu_bytes or None))
            )
    columns += [
        ("step time" + (" (× full)" if full else ""), step),
        ("tokens/s", lambda r: "—" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"),
        (metric.removeprefix("eval_") + arrow, lambda r: num_text(r.metric_final)),
        ("Δ vs start", lambda r: num_text(r.metric_delta, signed=True)),
    ]
    if metric == PREFERENCE_METRIC:
        columns.append(("reward margin ↑", lambda r: num_text(r.eval_after.get(MARGIN_METRIC))))
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
        + f", seed {s['seed']}"
        + (f"; objective {s['objective']} (beta {s['beta']:g})." if s.get("objective") else "."),
        f"Measured on {where}, {e['threads']} thread(s) on device {e['device']}; torch {e['torch']}, "
        f"python {e['python']}, loraq {e['loraq']}; total {report.wall_s:.0f} s.",
        "",
        report.table(),
        "",
        "Columns: *frozen / trained weights*: bytes of the weights that stay fixed (the base, "
        "quantized or not) and that train (adapters and new heads; everything for full); "
        f"*{STATE_COLUMN}*: frozen + 4 x trained, computed from the two columns before it, "
        "not measured: the model state a step holds (activations come on top); *saved file*: size on disk of the saved weights (the "
        "adapter; the whole model for full); *peak RSS*: the high-water mark (VmHWM) of the "
        "run's own process, including about "
        + size_text(_median([r.baseline_rss_bytes for r in report.runs if r.ok]))
        + " for Python, torch and transformers and the load of the float model before it is "
        "quantized; *peak RSS, training* (shown where it differs): the same from the end of step 1 "
        "on (the steps and the final eval); *step time*: median after warm-up (× full: relative to full "
        "fine-tuning's); *tokens/s*: non-pad tokens per second of those steps; *Δ vs start*: "
        "change of the eval metric over the same model (same quantization, untrained head or "
        "adapters) before training."
        + (
            " *rewards/accuracies*: the share of eval pairs whose chosen answer gets the higher "
            "reward; *reward margin*: their mean chosen minus rejected reward (rewards as "
            f"`loraq train`'s {s['objective']} logs them)."
            if s.get("objective")
            else ""
        ),
        "",
        "Methods: " + "; ".join(f"`{m}`: {h}" for m, h in s.get("method_help", {}).items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _median(values: list[int]) -> int | None:
    return int(statistics.median(values)) if values else None


def write_report(report: CompareReport, out: str | Path) -> dict[str, Path]:
    """Write ``compare.json`` (every number) and ``compare.md`` (the table, explained) into
    ``out``; returns their paths."""
    out = Path(out)
    paths = {"json": out / "compare.json", "md": out / "compare.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    paths["md"].write_text(format_markdown(report), encoding="utf-8")
    return paths
