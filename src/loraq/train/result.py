"""What a training run did: :class:`TrainResult`, also printed as the end-of-run summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraq.train.evaluation import format_metrics


@dataclass
class TrainResult:
    """What a run did; also printed as the final summary."""

    output_dir: Path
    steps: int
    total_steps: int
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    metric: str = ""
    best_metric: float | None = None
    best_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    weight_bytes: int = 0
    weight_parts: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    wall_time_s: float = 0.0
    # Torch CPU threads the run used (recorded in its checkpoints; a resumed run reuses it).
    num_threads: int = 0
    checkpoint: Path | None = None
    # Per optimizer step of this session: seconds (forward, backward, clip, optimizer; not eval
    # or checkpoints) and non-pad tokens. ``loraq compare`` takes medians and throughput here.
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """The human-readable end-of-run summary."""
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        lines = [
            "── loraq train summary " + "─" * 38,
            f"steps              {self.steps} / {self.total_steps}"
            + ("  (interrupted)" if self.interrupted else ""),
            f"trainable params   {self.trainable_params:,} / {self.total_params:,} ({pct:.2f}%)",
            f"weight bytes       {self.weight_bytes / 2**20:.2f} MiB"
            + (
                "  ("
                + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.weight_parts.items())
                + ")"
                if self.weight_parts
                else ""
            ),
            f"peak memory (RSS)  {self.peak_rss_bytes / 2**20:.1f} MiB"
            + (f"  (GPU {self.peak_gpu_bytes / 2**20:.1f} MiB)" if self.peak_gpu_bytes else ""),
            f"wall time          {self.wall_time_s:.1f} s",
        ]
        if self.eval_before:
            lines.append(f"eval before        {format_metrics(self.eval_before)}")
        if self.eval_after:
            lines.append(f"eval after         {format_metrics(self.eval_after)}")
        if self.best_metric is not None:
            name = self.metric.removeprefix("eval_")
            lines.append(f"best eval {name:<8} {self.best_metric:.4f} (step {self.best_step})")
        lines.append(f"output             {self.output_dir}")
        if self.interrupted and self.checkpoint is not None:
            lines.append(f"checkpoint         {self.checkpoint}  (continue with --resume)")
        return "\n".join(lines)
