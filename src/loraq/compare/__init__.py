"""``loraq compare``: full fine-tuning vs LoRA vs QLoRA vs quantized adapters, measured.

The comparative analysis of LoRA and QLoRA (complexity, memory, compute, parameter savings) as a
measurement anyone can rerun on their own model and data::

    loraq compare                                    # the built-in default (MiniLM, sentiment)
    loraq compare my.yaml --methods full,lora,qlora --ranks 4,8,16 --steps 50 --lr 1e-3

Every run uses the same model, data, seed, token budget (steps x batch size, identical batches)
and evaluation; only the method (and rank) changes. A preference config (``training.method``
``dpo`` or ``orpo``) trains every adapter method by that objective, and the metric compared is
the eval pairs' reward accuracy (with the mean reward margin beside it); ``full`` is refused
there. Each run is a separate Python process
(``python -m loraq.compare.worker SPEC.json``) so that peak memories do not mix: the peak is
the kernel's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``), which
``exec`` resets, unlike ``ru_maxrss``, which a child inherits from its parent.

Measured per run: trainable parameters; bytes of the frozen and the trained weights; the size
on disk of the saved weights (the adapter file, or the whole model for ``full``); peak memory;
median step time after warm-up and tokens/s; the eval metric before and after training.
Computed from those: the training state (weights + gradients + AdamW's two moments = frozen +
4 x trained). Written to ``OUT/compare.md``, ``OUT/compare.json`` (every number, per-step
times, the environment) and ``OUT/compare.png``; each run's own folder (adapter, metrics, log)
is ``OUT/runs/<method>-r<rank>/``.

The package, one job per module (imports run down this list):

================  ==========================================================================
:mod:`.methods`   the methods, ``--methods`` / ``--ranks`` parsing, one config per run
:mod:`.report`    :class:`RunResult`, :class:`CompareReport`, the table, compare.md/json
:mod:`.plot`      compare.png
:mod:`.worker`    one run in its own process: ``python -m loraq.compare.worker SPEC.json``
:mod:`.runner`    :func:`compare`: launch the workers, collect, write the report
================  ==========================================================================

The command line (``loraq compare``) lives in :mod:`loraq.cli`. Library use::

    from loraq.compare import compare
    from loraq.train.config import load_config
    report = compare(load_config(), methods=["lora", "qlora"], steps=10, out="runs/cmp")
    print(report.table())
"""

from loraq.compare.methods import (
    DEFAULT_METHODS,
    DEFAULT_OUT,
    DEFAULT_STEPS,
    FULL_LR_FACTOR,
    METHODS,
    RESERVED_KEYS,
    CompareError,
    Method,
    Run,
    parse_methods,
    parse_ranks,
    plan_runs,
    run_config,
)
from loraq.compare.plot import plot_report
from loraq.compare.report import CompareReport, RunResult, format_markdown, format_table
from loraq.compare.runner import compare, environment, launch, write_outputs
from loraq.compare.worker import run_worker, safetensors_payload, warmup_steps_of

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_OUT",
    "DEFAULT_STEPS",
    "FULL_LR_FACTOR",
    "METHODS",
    "RESERVED_KEYS",
    "CompareError",
    "CompareReport",
    "Method",
    "Run",
    "RunResult",
    "compare",
    "environment",
    "format_markdown",
    "format_table",
    "launch",
    "parse_methods",
    "parse_ranks",
    "plan_runs",
    "plot_report",
    "run_config",
    "run_worker",
    "safetensors_payload",
    "warmup_steps_of",
    "write_outputs",
]
