"""The training configuration's schema: four sections as plain dataclasses, and their error.

:mod:`loraq.train.config` reads YAML files and ``--key value`` overrides into these, checks
every value against its field's type and range, and writes them back out. The ``lora`` section
is a :class:`~loraq.model.config.LoraConfig`, built once when the file is read
(:func:`lora_section`): every reader gets typed values, and each default has one home, the
``LoraConfig`` field or, where ``loraq train`` chooses otherwise, :data:`TRAIN_LORA_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..model.config import LoraConfig

Task = Literal["causal-lm", "seq-cls"]
Schedule = Literal["cosine", "linear", "constant"]
DataFormat = Literal["auto", "jsonl", "csv", "tsv", "text"]
Method = Literal["lora", "full", "dpo", "orpo"]
PreferenceLoss = Literal["sigmoid", "ipo"]
Distributed = Literal["auto", "none", "ddp", "fsdp"]


#: The methods that train LoRA adapters (and save an adapter, not a model).
ADAPTER_METHODS: tuple[str, ...] = ("lora", "dpo", "orpo")
#: The methods that learn from preference pairs (``prompt`` / ``chosen`` / ``rejected``).
PREFERENCE_METHODS: tuple[str, ...] = ("dpo", "orpo")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


#: Where ``loraq train``'s ``lora`` section departs from :class:`LoraConfig`'s defaults (the
#: library keeps float32, PEFT's arithmetic): a run computes in ``auto``, bfloat16 where the
#: hardware runs it natively (see :mod:`loraq.core.precision`).
TRAIN_LORA_DEFAULTS: dict[str, Any] = {"compute_dtype": "auto"}


def lora_section(values: Mapping[str, Any]) -> LoraConfig:
    """The ``lora`` section as a validated :class:`LoraConfig`: :data:`TRAIN_LORA_DEFAULTS`,
    then ``values`` (``LoraConfig`` keywords) over them. Raises :class:`ConfigError` naming the
    bad field."""
    try:
        return LoraConfig(**{**TRAIN_LORA_DEFAULTS, **values})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"lora: {err}") from None


@dataclass
class ModelConfig:
    """Which model to fine-tune and for what.

    Attributes:
        path: a local Hugging Face model folder, a ``.gguf`` file, or ``pkg:NAME[/FILE.gguf]``
            (see :mod:`loraq.train.config`).
        task: ``causal-lm`` (AutoModelForCausalLM, next-token loss on completions) or
            ``seq-cls`` (AutoModelForSequenceClassification, one label per text).
    """

    path: str = ""
    task: Task = "causal-lm"


@dataclass
class DataConfig:
    """Where the examples come from and how they become token batches.

    Attributes:
        train: training file: ``.jsonl`` (``prompt``/``completion``, ``instruction``/``input``/
            ``output`` or ``text`` records), ``.csv``/``.tsv`` (text and label columns), or plain
            text (``.txt``: one document per non-empty line, for language modelling).
        eval: evaluation file in the same formats, or None.
        eval_split: when ``eval`` is None, hold out this fraction of ``train`` (seeded) for eval.
        format: ``auto`` (from the file suffix), ``jsonl``, ``csv``, ``tsv`` or ``text``.
        text_column: column / field holding the text (seq-cls, and ``text`` records).
        label_column: column / field holding the label (seq-cls).
        labels: label names in class-id order; inferred (sorted) from the training file if None.
        max_length: tokens per example (longer ones are truncated) or per packed block.
        packing: causal-lm only: concatenate examples and cut into ``max_length`` blocks.
        max_train_samples: use only the first N training records (None: all).
        max_eval_samples: use only the first N eval records (None: all).
    """

    train: str = ""
    eval: str | None = None
    eval_split: float = 0.0
    format: DataFormat = "auto"
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = None
    max_length: int = 256
    packing: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainingConfig:
    """How to optimise, log, evaluate and checkpoint.

    Attributes:
        method: ``lora`` (adapters per the ``lora`` section, optionally over a quantized base),
            ``full`` (plain full fine-tuning of every weight; the ``lora`` section is ignored)
            or ``dpo`` (adapters as for ``lora``, trained by Direct Preference Optimization on
            ``prompt`` / ``chosen`` / ``rejected`` records; the reference model is the same
            model with its adapters disabled, see :mod:`loraq.train.preference`) or ``orpo``
            (Odds Ratio Preference Optimization on the same records: no reference model; the
            NLL of the chosen sequences plus beta x the odds-ratio term).
        epochs: passes over the training data (used when ``max_steps`` is None).
        max_steps: optimizer steps to run; overrides ``epochs``.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        eval_batch_size: examples per eval batch (None: 2 x batch_size).
        lr: peak learning rate of AdamW.
        schedule: ``cosine`` or ``linear`` decay to zero after warm-up, or ``constant``.
        warmup_steps: linear warm-up steps (if 0, ``warmup_ratio`` x total steps is used).
        warmup_ratio: warm-up as a fraction of the total steps.
        weight_decay: AdamW weight decay, applied to matrices only (not biases/norms).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the B matrices train at ``lr`` times
            this ratio (e.g. 16), and the parameter groups follow PEFT's
            ``create_loraplus_optimizer`` (see :mod:`loraq.train.optim`); None: plain AdamW.
        max_grad_norm: clip the global gradient norm to this (None or 0: no clipping).
        gradient_checkpointing: recompute activations in backward to save memory.
        seed: seeds Python, NumPy and torch, the data order and the head initialisation.
        output_dir: where the adapter, config, metrics, plot and checkpoints go.
        eval_every: evaluate every N steps (None: only before and after training).
        eval_before: evaluate once before the first step (the untrained baseline).
        eval_tasks: lm-evaluation-harness task names (e.g. ``[loraq_tiny_mc]``) scored on the
            model being trained at each evaluation (before, every ``eval_every`` steps, after),
            in process, adapters active; the scores go into metrics.jsonl as
            ``eval_task/TASK/METRIC`` and into loss.png. Needs ``pip install 'loraq[eval]'``
            and ``model.task: causal-lm``; not under torchrun. None: off.
        eval_include_path: folders of local lm-eval task YAMLs for ``eval_tasks`` (relative
            to the config file), e.g. ``examples/eval``.
        eval_task_limit: documents scored per task at each evaluation (None: all of them).
        save_every: write a resumable checkpoint every N steps (None: only on Ctrl-C).
        keep_checkpoints: keep only the newest N checkpoints.
        resume: ``true`` continues from the newest checkpoint in ``output_dir``; a path continues
            from that checkpoint folder; ``false`` starts afresh.
        overwrite: starting afresh (``resume: false``) in an ``output_dir`` whose
            ``checkpoints/`` already holds checkpoints deletes them; without ``overwrite`` the
            run refuses to start, so an earlier run is never lost by accident.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        num_threads: torch CPU threads (None: the CPUs this process may run on, less those
            busy with other work per the 1-minute load average; at least 1; a resumed run
            reuses the count its checkpoint recorded).
        progress: show the tqdm progress bar.
        distributed: under torchrun, ``ddp`` (each rank holds the whole model, adapter
            gradients are all-reduced) or ``fsdp`` (FSDP2: the base, quantized or not, and the
            adapters are sharded across ranks); ``auto`` is ``ddp`` under torchrun and ``none``
            otherwise. ``batch_size`` is per rank (see :mod:`loraq.train.distributed`).
        distributed_timeout: seconds a collective may wait for the other ranks before failing.
        beta: ``method: dpo``: the strength of the pull towards the reference model (DPO's
            beta; IPO's tau); the rewards logged are beta x the log-probability ratios.
            ``method: orpo``: the weight of the odds-ratio term (ORPO's lambda); the rewards
            logged are beta x the per-token mean log-probabilities.
        loss_type: ``method: dpo`` only: ``sigmoid`` (DPO, Rafailov et al. 2023) or ``ipo`` (Azar
            et al. 2023, on log-ratios averaged per completion token), as TRL's ``DPOTrainer``.
    """

    method: Method = "lora"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    eval_batch_size: int | None = None
    lr: float = 2e-4
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = None
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/loraq"
    eval_every: int | None = None
    eval_before: bool = True
    eval_tasks: list[str] | None = None
    eval_include_path: list[str] | None = None
    eval_task_limit: int | None = 32
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool | str = False
    overwrite: bool = False
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    distributed: Distributed = "auto"
    distributed_timeout: float = 1800.0
    beta: float = 0.1
    loss_type: PreferenceLoss = "sigmoid"


@dataclass
class TrainConfig:
    """The whole run: ``model``, ``data``, ``lora`` and ``training``.

    ``lora`` is validated even for ``training.method: full`` (which does not use it), so a
    config never carries a section that could not run.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=lambda: lora_section({}))
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; the ``lora`` section lists every LoraConfig field (defaults too)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["lora"] = self.lora.to_dict()
        return {name: out[name] for name in ("model", "data", "lora", "training")}

    def to_yaml(self) -> str:
        """The resolved configuration as YAML text (what ``config.yaml`` in a run holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
}
