"""AdamW and its learning-rate schedule: linear warm-up, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from loraq.train.data import batches_per_epoch
from loraq.train.schema import ConfigError, TrainingConfig


def make_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter has requires_grad (check lora.targets)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(0.9, 0.999))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up from
    1/warmup to 1, then ``cosine`` or ``linear`` decay towards 0, or ``constant``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig, total_steps: int):
    """A ``LambdaLR`` following :func:`lr_factor` with the configured warm-up."""
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, t.schedule)
    )


def total_steps_of(t: TrainingConfig, n_examples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or enough for ``epochs`` passes."""
    if t.max_steps:
        return t.max_steps
    return math.ceil(t.epochs * batches_per_epoch(n_examples, t.batch_size) / t.grad_accum)
