"""The bridge to lm-evaluation-harness: a loraq model scored by lm-eval's own ``HFLM``.

lm-eval's HF wrapper accepts a model object (``HFLM(pretrained=model, tokenizer=...)``), and a
loraq model is still the transformers model it was (adapters are wrapped in place, quantized
bases are modules), so every scoring rule (log-likelihoods, few-shot prompts, metrics) is
lm-eval's. What loraq adds is the choice of *variant* (:mod:`.variants`) scored in each column:

============================  ===================================================
variant                       how the one loaded model is set before scoring
============================  ===================================================
``base``                      every adapter disabled (:func:`loraq.disable_adapters`)
``NAME``                      adapter ``NAME`` active (:func:`loraq.set_adapter`)
``NAME+merged``               adapter ``NAME`` folded into the base (:func:`loraq.merge`);
                              scored last, as the merge changes the base for good
============================  ===================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..model.surgery import disable_adapters, merge, set_adapter
from .variants import Variant

#: What a user without lm-eval is told.
INSTALL_HINT = (
    "lm-evaluation-harness is not installed: pip install 'loraq[eval]' (or pip install lm-eval)"
)


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (the submodule simple_evaluate lives in)
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return lm_eval


@contextlib.contextmanager
def selected(model: nn.Module, variant: Variant) -> Iterator[nn.Module]:
    """``model`` set up as ``variant`` for the duration (see the module's table)."""
    if variant.adapter is None:
        with disable_adapters(model):
            yield model
        return
    set_adapter(model, variant.adapter)
    if variant.merged:
        merge(model)
    yield model


@contextlib.contextmanager
def _weights_kept_as_loaded(model: nn.Module) -> Iterator[None]:
    """``HFLM`` calls ``model.tie_weights()``; a loraq model is loaded and tied already, and on a
    quantized base (GGUF, NF4 embeddings) the tied tensors are blocks, not ``weight``
    parameters, which transformers' tie_weights cannot find. A no-op for the duration."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def harness_model(model: nn.Module, tokenizer: Any, batch_size: int, max_length: int | None):
    """lm-eval's ``HFLM`` around ``model``: its scoring, log-softmax in float32."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    with _weights_kept_as_loaded(model):
        return HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            softmax_dtype=torch.float32,
        )


def task_manager(
    include_path: list[str | Path] | None, include_option: str = "--include-path"
) -> Any:
    """lm-eval's ``TaskManager`` with the folders of ``include_path`` added to its tasks (a
    missing folder is a ``ValueError`` naming ``include_option``)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    folders = [str(Path(p)) for p in include_path or []]
    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"{include_option} {folder}: no such folder")
    return TaskManager(include_path=folders or None)


def known_tasks(
    tasks: list[str],
    include_path: list[str | Path] | None,
    option: str = "--tasks",
    include_option: str = "--include-path",
) -> Any:
    """The ``TaskManager`` that knows every task of ``tasks``; an unknown one is a one-line
    ``ValueError`` naming ``option`` and the task."""
    manager = task_manager(include_path, include_option)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        hint = "" if include_path else f" (local task YAMLs need {include_option} DIR)"
        raise ValueError(f"{option}: unknown lm-eval task(s) {', '.join(missing)}{hint}")
    return manager


def score_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    columns: list[Variant],
    *,
    include_path: list[str | Path] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    log_samples: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{column name: lm-eval's results}`` for each variant of ``columns``, in order.

    Each value is what ``lm_eval.simple_evaluate`` returns (``results``, ``configs``, and with
    ``log_samples`` the per-item ``samples``). Unknown task names are a ``ValueError``.
    """
    lm_eval = require_lm_eval()
    manager = known_tasks(tasks, include_path)
    lm = harness_model(model, tokenizer, batch_size, max_length)
    scores: dict[str, dict[str, Any]] = {}
    for variant in columns:
        with selected(model, variant):
            scores[variant.name] = lm_eval.evaluator.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
            )
    return scores
