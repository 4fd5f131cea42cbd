"""lm-eval tasks scored at each evaluation of a training run (``training.eval_tasks``).

:class:`TaskScorer` is built once, when the run starts (so a missing lm-eval or an unknown task
stops the run before the model loads, naming the config key), and then scores the model being
trained as it is: its adapters active, in eval mode for the scoring and back in train mode
after. It leaves the run's random state as it found it, so a run with ``eval_tasks`` trains
exactly as one without (same dropout masks, same data order).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import UserError
from .harness import INSTALL_HINT, harness_model, known_tasks, require_lm_eval
from .report import flat_metrics


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and CUDA) global generators restored on exit."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def lm_eval_quiet() -> Iterator[None]:
    """lm-eval's warnings off for the duration (they are about how it was called, the same at
    every evaluation); its errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class TaskScorer:
    """Scores lm-eval ``tasks`` (at most ``limit`` documents each) on a model, again and again.

    ``option`` and ``include_option`` are the names the user gave the tasks and the folders
    under (config keys), so that every error names them.
    """

    def __init__(
        self,
        tasks: list[str],
        include_path: list[str | Path] | None = None,
        limit: int | None = None,
        batch_size: int = 1,
        *,
        option: str = "training.eval_tasks",
        include_option: str = "training.eval_include_path",
    ) -> None:
        try:
            self._lm_eval = require_lm_eval()
        except UserError:
            raise UserError(f"{option}: {INSTALL_HINT}") from None
        self.tasks = list(tasks)
        self.limit = limit
        self.batch_size = batch_size
        self._manager = known_tasks(self.tasks, include_path, option, include_option)

    def __call__(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """``{"task/metric": value}`` of ``model`` as it is set up now (see the module doc)."""
        was_training = model.training
        try:
            with random_state_kept(), lm_eval_quiet():
                lm = harness_model(model, tokenizer, self.batch_size, None)  # sets eval mode
                result = self._lm_eval.evaluator.simple_evaluate(
                    model=lm,
                    tasks=self.tasks,
                    limit=self.limit,
                    task_manager=self._manager,
                    log_samples=False,
                    bootstrap_iters=0,  # standard errors are not logged during training
                    random_seed=None,  # lm-eval would reseed the run's generators
                    numpy_random_seed=None,
                    torch_random_seed=None,
                )
        finally:
            model.train(was_training)
        return flat_metrics(result["results"])
