"""Preference optimisation (DPO, IPO, ORPO) with LoRA: the math as pure functions, then one
micro-step.

DPO's reference model is the model being trained with its adapters disabled
(:func:`loraq.disable_adapters`): no second copy of the base, quantized or not. ORPO needs no
reference. A batch holds the chosen rows, then the rejected rows
(:func:`loraq.train.data.collate`), labels -100 outside the answers.

    ===================  ====================================================================
    logp(y | x)          sum of log p(y_t | x, y_<t) over the answer's tokens (labels != -100)
    ratio                logp_policy(y | x) - logp_reference(y | x)     (reference: no_grad)
    reward               beta * ratio                          (logged as rewards/chosen ...)
    sigmoid (DPO)        -log sigmoid(beta * (ratio_chosen - ratio_rejected))
    ipo                  (ratio_chosen / n_chosen - ratio_rejected / n_rejected - 1/(2 beta))^2
    ===================  ====================================================================

ORPO (Hong et al. 2024), as TRL's ``ORPOTrainer`` computes it:

    ===================  ====================================================================
    avg_logp(y | x)      logp(y | x) / (answer tokens)
    log_odds             (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))
    loss                 nll - beta * log sigmoid(log_odds)      (mean over the pairs)
    nll                  cross-entropy over the chosen rows' tokens, prompt AND answer, as a
                         mean over those tokens (TRL and the authors' code; the paper writes
                         the answer only)
    reward               beta * avg_logp                       (logged as rewards/chosen ...)
    ===================  ====================================================================

These equal TRL's ``DPOTrainer`` (``loss_type`` ``sigmoid`` and ``ipo``, the reference being the
adapter-disabled PEFT model) and ``trl.experimental.orpo.ORPOTrainer``; ``tests/test_dpo.py``
and ``tests/test_orpo.py`` compare them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.precision import autocast_for
from ..model.surgery import disable_adapters
from .data import IGNORE_INDEX, MicroBatch, eval_batches
from .distributed import Dist, agree, gradient_sync

#: The keys of the reward metrics in metrics.jsonl (eval lines prefix them with ``eval_``).
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
#: ORPO's further metrics (means over pairs; TRL's names): the chosen NLL, log sigmoid of the
#: log odds ratio, and the log odds ratio itself.
ORPO_KEYS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


# ----------------------------------------------------------------------------- the math
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability (float32) of the labelled next tokens: position t's
    logits score token t+1 wherever ``labels[t+1] != -100``."""
    return _labelled_sum(torch.log_softmax(logits[:, :-1].float(), dim=-1), labels)


def _labelled_sum(logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of ``logps[t, labels[t+1]]`` over the labelled positions (``logps``:
    the log-softmax of the logits without their last position)."""
    targets = labels[:, 1:]
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(-1)


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


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation on either side of ``-log 2``."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's per-pair odds-ratio term ``-beta * log sigmoid(log_odds)`` and ``log_odds``,
    from the per-token mean log-probabilities of the answers (see the module table)."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)
    )
    return -beta * F.logsigmoid(log_odds), log_odds


@dataclass
class PairLosses:
    """One batch of pairs: per-pair losses (with gradient), rewards and ``extras`` (per-pair
    values of further metrics, e.g. :data:`ORPO_KEYS`; all detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def pair_losses(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    loss_type: str,
    method: str = "dpo",
    nll_weight: float | None = None,
) -> PairLosses:
    """The per-pair losses and rewards of a batch of pairs under ``method``.

    ``dpo``: the reference forward (adapters disabled, no gradient), then the policy forward;
    the losses of :func:`preference_loss` and the rewards ``beta * ratio``. ``orpo``: one policy
    forward (see :func:`orpo_pair_losses`; ``nll_weight`` goes there).
    """
    if method == "orpo":
        return orpo_pair_losses(model, batch, beta, nll_weight)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), disable_adapters(model):
        reference = sequence_logps(model(**inputs).logits, labels)
    ratios = sequence_logps(model(**inputs).logits, labels) - reference
    chosen, rejected = ratios.chunk(2)
    lengths = answer_lengths(labels).chunk(2)
    losses = preference_loss(chosen, rejected, beta, loss_type, *lengths)
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


def chosen_nll_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels scoring every real token of the chosen rows, prompt included (ORPO's NLL)."""
    n = batch["input_ids"].shape[0] // 2
    ids, mask = batch["input_ids"][:n], batch["attention_mask"][:n]
    return ids.masked_fill(mask == 0, IGNORE_INDEX)


def orpo_pair_losses(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float,
    nll_weight: float | None = None,
) -> PairLosses:
    """ORPO's per-pair losses: the chosen rows' NLL share plus :func:`odds_ratio_loss`.

    The NLL is a mean over tokens, not over pairs: pair i carries ``nll_sum_i * nll_weight``
    with ``nll_weight = pairs / tokens`` of the batch the means are taken over, so that a mean
    over its pairs is the token mean. None: this batch's; a rank's share of a global batch
    passes the global batch's ratio.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # One log-softmax over the vocabulary serves both sums (it is the largest tensor here).
    logps = torch.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    avg = _labelled_sum(logps, labels) / answer_lengths(labels).clamp(min=1)
    chosen, rejected = avg.chunk(2)
    odds_losses, log_odds = odds_ratio_loss(chosen, rejected, beta)
    nll_labels = chosen_nll_labels(batch)
    nll_sums = -_labelled_sum(logps[: chosen.numel()], nll_labels)
    if nll_weight is None:
        nll_weight = chosen.numel() / max(float(answer_lengths(nll_labels).sum()), 1.0)
    nll = nll_sums * nll_weight
    extras = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": F.logsigmoid(log_odds).detach(),
        "log_odds_chosen": log_odds.detach(),
    }
    return PairLosses(nll + odds_losses, beta * chosen.detach(), beta * rejected.detach(), extras)


# ----------------------------------------------------------------------------- bookkeeping
@dataclass
class RewardSums:
    """Reward sums over the pairs of a step or an eval (means are taken at the end);
    ``extras``: sums of the per-pair extras (:attr:`PairLosses.extras`) by key."""

    pairs: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0
    correct: float = 0.0
    loss: float = 0.0
    extras: dict[str, float] = field(default_factory=dict)

    def add(self, out: PairLosses, weight: float = 1.0) -> None:
        """Count the pairs of ``out`` (``weight`` 0: a placeholder share, counted as none)."""
        self.pairs += weight * out.losses.numel()
        self.chosen += weight * out.chosen_rewards.sum().item()
        self.rejected += weight * out.rejected_rewards.sum().item()
        self.correct += weight * (out.chosen_rewards > out.rejected_rewards).sum().item()
        self.loss += weight * out.losses.detach().sum().item()
        for key, values in out.extras.items():
            self.extras[key] = self.extras.get(key, 0.0) + weight * values.sum().item()

    def as_list(self) -> list[float]:
        """The sums in field order, then the extras by sorted key (for one all-reduce across
        ranks, which all compute the same extras)."""
        base = [self.pairs, self.chosen, self.rejected, self.correct, self.loss]
        return base + [self.extras[k] for k in sorted(self.extras)]

    def with_values(self, values: list[float]) -> RewardSums:
        """A copy holding ``values`` (in :meth:`as_list`'s order), e.g. the sums over ranks."""
        keys = sorted(self.extras)
        return RewardSums(*values[:5], extras=dict(zip(keys, values[5:], strict=True)))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and
        ``rewards/accuracies`` (then the extras) as means over the pairs, each key prefixed
        by ``prefix``."""
        n = max(self.pairs, 1.0)
        values = (self.chosen / n, self.rejected / n, (self.chosen - self.rejected) / n)
        values += (self.correct / n,)
        out = {prefix + k: v for k, v in zip(REWARD_KEYS, values)}
        return out | {prefix + k: v / n for k, v in sorted(self.extras.items())}


# ----------------------------------------------------------------------------- the step
def micro_step(
    model: nn.Module,
    micro: MicroBatch,
    sums: RewardSums,
    *,
    beta: float,
    loss_type: str,
    method: str = "dpo",
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
    nll_weight = None
    if method == "orpo":  # ORPO's NLL is a mean over the global micro-batch's chosen tokens
        local = micro.weight * float(answer_lengths(chosen_nll_labels(batch)).sum())
        nll_weight = micro.global_items / max(agree([local], info)[0], 1.0)
    with gradient_sync(model, info, last):
        with autocast_for(compute_dtype, device):
            out = pair_losses(model, batch, beta, loss_type, method, nll_weight)
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
    method: str = "dpo",
) -> dict[str, float]:
    """``eval_loss`` (mean over pairs) and the ``eval_rewards/...`` means (and ORPO's
    ``eval_`` extras); ``{}`` with no pair."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = RewardSums()
    try:
        for batch in eval_batches(examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            sums.add(pair_losses(model, batch, beta, loss_type, method))
    finally:
        model.train(was_training)
    if not sums.pairs:
        return {}
    return {"eval_loss": sums.loss / sums.pairs, **sums.metrics("eval_")}
