"""What ``loraq compare`` runs: the methods, the ranks, one config per run.

Each adapter method states every quantization / variant field, so the config's own choice never
leaks into a method that should not have it; ``full`` trains every weight at a lower lr.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraq.train.config import ConfigError, TrainConfig, from_flat
from loraq.train.schema import PREFERENCE_METHODS

#: Optimizer steps per run when neither ``--steps`` nor ``--training.max_steps`` is given (the
#: config's ``epochs`` do not apply: every run gets exactly this budget). With the built-in
#: default all six methods take about 2.5 minutes on 2 busy CPU cores (one torch thread), where
#: ``loraq train``'s 40 steps alone take 40 s; the whole must stay under 10 minutes.
DEFAULT_STEPS = 20
#: ``full`` runs at this fraction of the config's lr unless ``--full-lr`` is given: adapter
#: learning rates are about 10x full fine-tuning's (the built-in default's 2e-3 makes full
#: fine-tuning of MiniLM diverge to chance accuracy; 2e-4 reaches 0.99).
FULL_LR_FACTOR = 0.1
#: Where the report and the runs go unless ``--out`` says otherwise.
DEFAULT_OUT = "runs/compare"
#: Files a worker writes into its run folder.
SPEC_NAME, RESULT_NAME, LOG_NAME = "spec.json", "result.json", "worker.log"
#: Training keys that compare sets itself (an override of them would be ignored or misleading).
RESERVED_KEYS = {
    "training.method": "use --methods (a preference objective may be set: "
    + " or ".join(PREFERENCE_METHODS)
    + ")",
    "training.resume": "every compare run starts afresh",
    "training.output_dir": "use --out",
}


class CompareError(ConfigError):
    """Bad input to ``loraq compare`` (a method name, a rank, an option); the message says which."""


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One way to fine-tune.

    Attributes:
        name: what ``--methods`` calls it.
        help: one line for ``--help`` and the report.
        lora: the ``lora`` settings it forces over the config's (None: full fine-tuning, where
            the ``lora`` section is not used and every weight trains).
    """

    name: str
    help: str
    lora: dict[str, Any] | None

    @property
    def uses_rank(self) -> bool:
        """True for adapter methods (one run per rank); full fine-tuning has no rank."""
        return self.lora is not None


# Each adapter method states every quantization / variant field, so the config's own choice
# (the built-in default has quant: nf4) never leaks into a method that should not have it.
_PLAIN = {"quant": None, "use_dora": False, "adapter_bits": None}
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning: every weight trains (float32)", None),
        Method("lora", "LoRA adapters over the float32 base", dict(_PLAIN)),
        Method(
            "qlora",
            "QLoRA: LoRA over an NF4 base with double quantization",
            {**_PLAIN, "quant": "nf4", "double_quant": True},
        ),
        Method(
            "qlora-a4",
            "QLoRA with the adapters themselves on a 4-bit grid (adapter_bits=4)",
            {**_PLAIN, "quant": "nf4", "double_quant": True, "adapter_bits": 4},
        ),
        Method("int8", "LoRA over an 8-bit blockwise base", {**_PLAIN, "quant": "int8"}),
        Method(
            "dora",
            "DoRA (weight-decomposed LoRA) over the float32 base",
            {**_PLAIN, "use_dora": True},
        ),
    )
}
#: What ``loraq compare`` runs when ``--methods`` is not given: all of them (all that train
#: adapters for a preference config, see :func:`default_methods`).
DEFAULT_METHODS = tuple(METHODS)


def preference_objective(cfg: TrainConfig) -> str | None:
    """The config's preference method (``dpo``, ``orpo``), which every adapter run keeps (the
    compared methods change how the adapters are held, not what they learn); None for SFT."""
    method = cfg.training.method
    return method if method in PREFERENCE_METHODS else None


def default_methods(cfg: TrainConfig) -> tuple[str, ...]:
    """:data:`DEFAULT_METHODS`, less ``full`` for a preference config (loraq trains preferences
    with adapters only: the reference is the model with its adapters off)."""
    if preference_objective(cfg) is None:
        return DEFAULT_METHODS
    return tuple(m for m in DEFAULT_METHODS if METHODS[m].uses_rank)


def reserved_override(key: str, value: Any) -> str | None:
    """Why ``--key value`` may not be given to compare (see :data:`RESERVED_KEYS`), or None; a
    preference objective for ``training.method`` is allowed."""
    if key == "training.method" and value in PREFERENCE_METHODS:
        return None
    return RESERVED_KEYS.get(key)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"full,lora,qlora"`` (or a list) to validated method names, in order, without repeats.

    ``all`` means every method. Raises :class:`CompareError` naming an unknown method, the
    closest valid one, and the whole list.
    """
    words = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for word in (w.strip().lower().replace("_", "-") for w in words):
        if not word:
            continue
        if word == "all":
            names += [n for n in METHODS if n not in names]
            continue
        if word not in METHODS:
            close = difflib.get_close_matches(word, list(METHODS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise CompareError(
                f"unknown method '{word}'{hint} (valid methods: {', '.join(METHODS)}, or all)"
            )
        if word not in names:
            names.append(word)
    if not names:
        raise CompareError(f"--methods is empty (valid methods: {', '.join(METHODS)}, or all)")
    return names


def parse_ranks(text: str | Sequence[int]) -> list[int]:
    """``"4,8,16"`` (or a list) to distinct positive integer ranks, in order.

    Raises :class:`CompareError` for anything that is not a positive integer.
    """
    words = text.split(",") if isinstance(text, str) else list(text)
    ranks: list[int] = []
    for word in words:
        if isinstance(word, str):
            word = word.strip()
            if not word:
                continue
        ok = isinstance(word, int) and not isinstance(word, bool)
        if isinstance(word, str) and re.fullmatch(r"\+?\d+", word):
            word, ok = int(word), True
        if not ok or word <= 0:
            raise CompareError(f"--ranks: {word!r} is not a positive integer (e.g. --ranks 4,8,16)")
        if word not in ranks:
            ranks.append(word)
    if not ranks:
        raise CompareError("--ranks is empty (e.g. --ranks 4,8,16)")
    return ranks


@dataclass(frozen=True)
class Run:
    """One cell of the comparison: a method, and its rank for adapter methods."""

    method: str
    rank: int | None

    @property
    def slug(self) -> str:
        """Folder name of the run: ``full`` or ``qlora-r8``."""
        return self.method if self.rank is None else f"{self.method}-r{self.rank}"


def plan_runs(methods: Sequence[str], ranks: Sequence[int]) -> list[Run]:
    """Each adapter method x each rank; ``full`` once. In the order given."""
    runs = []
    for name in methods:
        if METHODS[name].uses_rank:
            runs += [Run(name, r) for r in ranks]
        else:
            runs.append(Run(name, None))
    return runs


def run_config(
    cfg: TrainConfig, run: Run, folder: Path, threads: int, full_lr: float | None
) -> TrainConfig:
    """A copy of ``cfg`` for one run: the method's settings (a preference config keeps its
    objective), no mid-run eval or checkpoints, no progress bar, the shared thread count, and
    ``folder`` as output. Raises :class:`CompareError` for ``full`` on a preference config."""
    flat: dict[str, Any] = {}
    for section in ("model", "data", "training"):
        flat.update({f"{section}.{k}": v for k, v in asdict(getattr(cfg, section)).items()})
    method = METHODS[run.method]
    objective = preference_objective(cfg)
    lora = cfg.lora.to_dict()
    if method.lora is None and objective is not None:
        raise CompareError(
            f"{run.slug}: training.method '{objective}' trains adapters only (its reference is "
            f"the model with its adapters off); leave 'full' out of --methods"
        )
    if method.lora is None:
        flat["training.method"] = "full"
        if full_lr is not None:
            flat["training.lr"] = full_lr
    else:
        flat["training.method"] = objective or "lora"
        lora.update(method.lora)
        lora["r"] = run.rank
    flat.update({f"lora.{k}": v for k, v in lora.items()})
    flat.update(
        {
            "training.output_dir": str(folder),
            "training.eval_every": None,  # mid-run evals would only add time to the run
            "training.save_every": None,
            "training.eval_before": True,  # the frozen start, for the metric's change
            "training.resume": False,
            "training.progress": False,
            "training.num_threads": threads,
        }
    )
    try:
        return from_flat(flat)
    except ConfigError as err:
        raise CompareError(f"{run.slug}: {err}") from None
