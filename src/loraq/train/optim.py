"""AdamW and its learning-rate schedule: linear warm-up, then cosine, linear or constant.

The parameter groups, by ``training.loraplus_lr_ratio``:

==============================  ==========================================  ================
group                           holds                                       lr, weight decay
==============================  ==========================================  ================
*plain* (ratio null)            matrices                                    lr, weight_decay
                                vectors (biases, norms, DoRA magnitudes)    lr, 0
*LoRA+* (as PEFT's              A matrices and other matrices               lr, weight_decay
``create_loraplus_optimizer``)  embedding adapters (A and B)                1e-6, weight_decay
                                B matrices, vectors outside LayerNorms      lr·ratio, weight_decay
                                  whose names lack "bias"
                                the other vectors (biases, LayerNorms)      lr·ratio, 0
==============================  ==========================================  ================

Empty groups are left out; the schedule scales every group's lr by the same factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraq.layers.lora import LoRALayer
from loraq.train.data import batches_per_epoch
from loraq.train.schema import ConfigError, TrainingConfig

#: LoRA+'s learning rate for adapters on embeddings (PEFT's ``loraplus_lr_embedding`` default).
LORAPLUS_LR_EMBEDDING = 1e-6
#: AdamW's betas for every run.
BETAS = (0.9, 0.999)


def make_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, grouped as the module table says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter has requires_grad (check lora.targets)")
    if t.loraplus_lr_ratio is not None:
        groups = loraplus_groups(model, t.lr, t.loraplus_lr_ratio, t.weight_decay)
    else:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=BETAS)


def loraplus_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    weight_decay: float,
    lr_embedding: float = LORAPLUS_LR_EMBEDDING,
) -> list[dict]:
    """LoRA+'s parameter groups for ``model``'s trainable parameters, in PEFT's order and by
    PEFT's rules (see the module table): ``[A, embedding, B, B without decay]``, each a dict
    with ``params``, ``lr`` and ``weight_decay`` (empty groups included)."""
    modules = dict(model.named_modules())
    in_layer_norm = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in modules.items()
        if isinstance(module, nn.LayerNorm)  # transformers' ALL_LAYERNORM_LAYERS, as PEFT
        for name, _ in module.named_parameters()
    }
    a, embedding, b, b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # An adapter tensor lives in a dict below its layer: <layer>.lora_embedding_A.<adapter>
        owner = modules.get(".".join(name.split(".")[:-2]))
        if isinstance(owner, LoRALayer) and owner.kind == "embedding":
            embedding.append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = name not in in_layer_norm and "bias" not in name
            (b if decays else b_no_decay).append(param)
        else:
            a.append(param)
    return [
        {"params": a, "weight_decay": weight_decay, "lr": lr},
        {"params": embedding, "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": b, "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * ratio},
    ]


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
