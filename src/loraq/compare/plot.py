"""``compare.png``: peak memory, step time and quality per run, side by side."""

from __future__ import annotations

from pathlib import Path

from loraq.compare.methods import METHODS
from loraq.compare.report import CompareReport


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
