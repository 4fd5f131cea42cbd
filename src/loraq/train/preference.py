"""Preference optimisation (DPO, IPO) with LoRA: the math as pure functions, then one micro-step.

The reference model is the model being trained with its adapters disabled
(:func:`loraq.disable_adapters`): no second copy of the base, quantized or not. A batch holds
the chosen rows, then the rejected rows (:func:`loraq.train.data.collate`), labels -100 outside
the answers.

    ===================  ====================================================================
    logp(y | x)          sum of log p(y_t | x, y_<t) over the answer's tokens (labels != -100)
    ratio                logp_policy(y | x) - logp_reference(y | x)     (reference: no_grad)
    reward               beta * ratio                          (logged as rewards/chosen ...)
    sigmoid (DPO)        -log sigmoid(beta * (ratio_chosen - ratio_rejected))
    ipo                  (ratio_chosen / n_chosen - ratio_rejected / n_rejected - 1/(2 beta))^2
    ===================  ====================================================================

These equal TRL's ``DPOTrainer`` (``loss_type`` ``sigmoid`` and ``ipo``, the reference being the
adapter-disabled PEFT model); ``tests/test_dpo.py`` compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.precision import autocast_for
from ..model.surgery import disable_adapters
from .data import IGNORE_INDEX, MicroBatch, eval_batches
from .distributed import Dist, gradient_sync

#: The keys of the reward metrics in metrics.jsonl (eval lines prefix them with ``eval_``).
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# ----------------------------------------------------------------------------- the math
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability (float32) of the labelled next tokens: position t's
    logits score token t+1 wherever ``labels[t+1] != -100``."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def answer_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the number of scored tokens (as :func:`sequence_logps` counts them)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def preference_loss(
    chosen_ratios: torch.Tensor,
    rejected_ratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss from the policy-minus-reference log-probability ratios (see the module
    table); ``ipo`` needs the answer lengths."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        delta = chosen_ratios / chosen_lengths.clamp(min=1) - rejected_ratios / (
            rejected_lengths.clamp(min=1)
        )
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


@dataclass
class PairLosses:
    """One batch of pairs: per-pair losses (with gradient) and rewards (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], beta: float, loss_type: str
) -> PairLosses:
    """The reference forward (adapters disabled, no gradient), then the policy forward, of a
    batch of pairs; the losses of :func:`preference_loss` and the rewards ``beta * ratio``."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), disable_adapters(model):
        reference = sequence_logps(model(**inputs).logits, labels)
    ratios = sequence_logps(model(**inputs).logits, labels) - reference
    chosen, rejected = ratios.chunk(2)
    lengths = answer_lengths(labels).chunk(2)
    losses = preference_loss(chosen, rejected, beta, loss_type, *lengths)
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class RewardSums:
    """Reward sums over the pairs of a step or an eval (means are taken at the end)."""

    pairs: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0
    correct: float = 0.0
    loss: float = 0.0

    def add(self, out: PairLosses, weight: float = 1.0) -> None:
        """Count the pairs of ``out`` (``weight`` 0: a placeholder share, counted as none)."""
        self.pairs += weight * out.losses.numel()
        self.chosen += weight * out.chosen_rewards.sum().item()
        self.rejected += weight * out.rejected_rewards.sum().item()
        self.correct += weight * (out.chosen_rewards > out.rejected_rewards).sum().item()
        self.loss += weight * out.losses.detach().sum().item()

    def as_list(self) -> list[float]:
        """The sums in field order (for one all-reduce across ranks)."""
        return [self.pairs, self.chosen, self.rejected, self.correct, self.loss]

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and
        ``rewards/accuracies`` as means over the pairs, each key prefixed by ``prefix``."""
        n = max(self.pairs, 1.0)
        values = (self.chosen / n, self.rejected / n, (self.chosen - self.rejected) / n)
        values += (self.correct / n,)
        return {prefix + k: v for k, v in zip(REWARD_KEYS, values)}


# ----------------------------------------------------------------------------- the step
def micro_step(
    model: nn.Module,
    micro: MicroBatch,
    sums: RewardSums,
    *,
    beta: float,
    loss_type: str,
    grad_accum: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    info: Dist,
    last: bool,
) -> tuple[float, int]:
    """Forward and backward of one micro-batch of pairs (this rank's share under DDP / FSDP,
    whose gradients synchronise on the ``last`` micro-batch); adds its rewards to ``sums``.

    The loss is the mean over the global micro-batch's pairs, scaled by ``world_size`` as
    DDP / FSDP average gradients over ranks. Returns ``(this rank's part of the step loss, its
    non-padding tokens)``.
    """
    batch = {k: v.to(device) for k, v in micro.batch.items()}
    with gradient_sync(model, info, last):
        with autocast_for(compute_dtype, device):
            out = pair_losses(model, batch, beta, loss_type)
        part = out.losses.sum() * (micro.weight / max(micro.global_items, 1))
        (part * info.world_size / grad_accum).backward()
    sums.add(out, micro.weight)
    tokens = int(micro.weight * batch["attention_mask"].sum().item())
    return part.item() / grad_accum, tokens


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    examples: list,
    batch_size: int,
    pad_id: int,
    beta: float,
    loss_type: str,
) -> dict[str, float]:
    """``eval_loss`` (mean over pairs) and the ``eval_rewards/...`` means; ``{}`` with no pair."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = RewardSums()
    try:
        for batch in eval_batches(examples, batch_size, pad_id):
            sums.add(
                pair_losses(model, {k: v.to(device) for k, v in batch.items()}, beta, loss_type)
            )
    finally:
        model.train(was_training)
    if not sums.pairs:
        return {}
    return {"eval_loss": sums.loss / sums.pairs, **sums.metrics("eval_")}
