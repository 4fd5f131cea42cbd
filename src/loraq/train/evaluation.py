"""Eval metrics of a model over tokenized examples: loss, accuracy or perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loraq.train.data import IGNORE_INDEX, eval_batches


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[dict[str, Any]], task: str, batch_size: int, pad_id: int
) -> dict[str, float]:
    """Eval metrics over ``examples``.

    ``seq-cls``: ``eval_loss`` (mean cross-entropy) and ``eval_accuracy``. ``causal-lm``:
    ``eval_loss`` (mean over all labelled tokens) and ``eval_perplexity``. Returns ``{}`` when
    there is nothing to score (no examples, or no labelled token): callers must say so.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count, correct = 0.0, 0, 0
    try:
        for batch in eval_batches(examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "seq-cls":
                loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(-1) == labels).sum().item()
                count += labels.numel()
            else:
                targets = labels[:, 1:]
                loss_sum += nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                ).item()
                count += (targets != IGNORE_INDEX).sum().item()
    finally:
        model.train(was_training)
    if count == 0:
        return {}
    loss = loss_sum / count
    if task == "seq-cls":
        return {"eval_loss": loss, "eval_accuracy": correct / count}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def main_metric(task: str) -> tuple[str, bool]:
    """The metric that picks the best eval, and whether higher is better."""
    return ("eval_accuracy", True) if task == "seq-cls" else ("eval_loss", False)


def format_metrics(metrics: dict[str, float]) -> str:
    """``accuracy 0.9420  loss 0.1731`` style text."""
    return "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())
