"""Run metrics: ``metrics.jsonl`` (one JSON object per line) and ``loss.png``.

Training lines look like ``{"step": 12, "epoch": 0, "loss": 0.41, "lr": 0.0009, "tokens_per_s":
5120.0}``; eval lines like ``{"step": 50, "eval_loss": 0.2, "eval_accuracy": 0.94}``. Preference
runs (``method: dpo`` or ``orpo``) add ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` and ``rewards/accuracies`` to both (``eval_rewards/...`` on eval lines);
ORPO adds ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen``. ``training.eval_tasks`` adds
lm-eval's scores to eval lines as ``eval_task/TASK/METRIC`` (e.g. ``eval_task/loraq_tiny_mc/acc``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The prefix of the lm-eval task scores on eval lines (``training.eval_tasks``).
TASK_PREFIX = "eval_task/"


class MetricsWriter:
    """Append-only ``metrics.jsonl`` writer, flushed after every line so a crash loses nothing."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        """Open ``path``; start it afresh, or (when resuming) keep lines with step <= resume_step.

        Lines past the checkpoint were written by the run that crashed and will be written again.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard draws it)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def _plot_rewards(ax, train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    """Reward margin and accuracy per step (train, and eval as dots)."""
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["rewards/margins"] for r in train], color="tab:purple", label="margin")
    ax.plot(steps, [r["rewards/accuracies"] for r in train], color="tab:green", label="accuracy")
    for key, color in (("margins", "tab:purple"), ("accuracies", "tab:green")):
        if evals:
            values = [r[f"eval_rewards/{key}"] for r in evals]
            ax.plot([r["step"] for r in evals], values, "o", color=color, label=f"eval {key}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("rewards: margin and accuracy (chosen vs rejected)")


def _plot_tasks(ax, records: list[dict[str, Any]]) -> None:
    """Each lm-eval task score (``eval_task/TASK/METRIC``) per step, one line each."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith(TASK_PREFIX)))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), "o-", lw=1.5, label=key.removeprefix(TASK_PREFIX))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("lm-eval tasks")


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw train loss (raw and smoothed) and eval loss per step, plus eval accuracy, the
    reward margins and accuracies of preference runs and the lm-eval task scores, if any.

    Uses matplotlib's Agg backend (no display needed). Returns the image path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    accs = [r for r in records if "eval_accuracy" in r]
    rewards = [r for r in records if "rewards/margins" in r]
    tasks = [r for r in records if any(k.startswith(TASK_PREFIX) for k in r)]
    ncols = 1 + bool(accs) + bool(rewards) + bool(tasks)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss")
        if len(losses) > 10:
            weight = min(0.95, max(0.5, 1 - 10 / len(losses)))  # ~10% of the run as window
            ax.plot(
                steps, smooth(losses, weight), color="tab:blue", lw=1.8, label="train (smoothed)"
            )
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            color="tab:orange",
            lw=1.8,
            label="eval loss",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    ax.set_title(title or "loss")
    if accs:
        ax2 = axes[0][1]
        ax2.plot(
            [r["step"] for r in accs],
            [r["eval_accuracy"] for r in accs],
            "o-",
            color="tab:green",
            lw=1.8,
        )
        ax2.set_xlabel("step")
        ax2.set_ylabel("eval accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.grid(alpha=0.3)
        ax2.set_title("eval accuracy")
    if rewards:
        _plot_rewards(
            axes[0][1 + bool(accs)], rewards, [r for r in records if "eval_rewards/margins" in r]
        )
    if tasks:
        _plot_tasks(axes[0][ncols - 1], tasks)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
