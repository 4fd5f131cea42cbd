"""The training recipe: :func:`train` runs one fine-tuning from a TrainConfig, top to bottom.

    session = setup(cfg)                   tokenizer + data (text, or preference pairs for dpo)
                                           -> model (+ LoRA / QLoRA)
                                           -> AdamW + schedule -> resume? -> metrics.jsonl
    evaluate_session(session, 0)           the untrained baseline
    while steps remain:
        stats = train_step(session)        grad accumulation (dpo: preference.micro_step),
                                           clip, optimizer + schedule step
        log_step(session, stats)           metrics.jsonl line, progress bar
        evaluate_session / save_session_checkpoint   every eval_every / save_every steps
        (Ctrl-C: checkpoint and stop)
    finish(session)                        eval after, adapter or model, loss.png, summary

The seams, for a recipe of your own (a distributed one, say):

* :func:`setup` builds a :class:`Session`: everything the steps need (model, optimizer,
  scheduler, the micro-batch stream, the :class:`~loraq.train.checkpoint.TrainState`, the
  metrics writer, the thread count). ``wrap_model`` is called on the trainable model before the
  optimizer is built (where a DDP / FSDP wrapper goes): :func:`train_step` runs the wrapper
  (``session.wrapped``), while evaluation, checkpoints and outputs use the plain model
  (``session.model``). ``main_process=False`` makes a session that writes nothing (no metrics,
  config, checkpoints or outputs), for ranks other than 0.
* :func:`train_step` does one optimizer step over ``training.grad_accum`` micro-batches from
  ``session.stream`` and returns its :class:`StepStats`; it touches nothing but the model,
  optimizer, scheduler, stream and ``session.state``.
* :func:`evaluate_session` evaluates, writes the scores (or why there are none) to
  metrics.jsonl and tracks the best value of the main metric.
* :func:`save_session_checkpoint` writes a resumable checkpoint; :func:`finish` does the final
  eval and writes the outputs.

The helpers under it compose on their own for a loop of your own: :mod:`.modeling` (load and
prepare the model), :mod:`.optim` (AdamW, schedule), :mod:`.evaluation`, :mod:`.checkpoint`,
:mod:`.outputs` (the saved adapter / model), :mod:`.inference` (load what a run trained).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loraq.core.precision import autocast_for, resolve_compute_dtype
from loraq.core.probes import auto_threads, peak_rss_bytes
from loraq.eval.during_training import TaskScorer
from loraq.train import checkpoint as ckpt
from loraq.train import distributed, distributed_checkpoint, preference
from loraq.train.config import ConfigError, TrainConfig, save_config
from loraq.train.data import (
    Datasets,
    MicroBatch,
    batches_per_epoch,
    load_datasets,
    micro_batches,
    tokenize_records,
)
from loraq.train.evaluation import evaluate, format_metrics, main_metric
from loraq.train.metrics import TASK_PREFIX, MetricsWriter, plot_metrics, read_metrics
from loraq.train.modeling import (
    count_params,
    load_model,
    load_tokenizer,
    prepare_model,
    resolve_device,
)
from loraq.train.optim import make_optimizer, make_scheduler, total_steps_of
from loraq.train.outputs import save_trained
from loraq.train.preference_data import tokenize_pairs
from loraq.train.result import TrainResult
from loraq.train.schema import ADAPTER_METHODS, PREFERENCE_METHODS
from loraq.train.signals import GracefulInterrupt, StopSignals

#: What metrics.jsonl and the log say when the eval set (asked for by ``data.eval`` or
#: ``data.eval_split``) has no labelled token to score: an empty file, say.
NO_EVAL_TOKENS = "the eval set has no labelled tokens (no examples?): no eval metric"


# ----------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Session:
    """Everything one run's steps need; built by :func:`setup`, read and updated by the rest."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    tokenizer: Any
    data: Datasets
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: ckpt.TrainState
    stream: Iterator[MicroBatch]
    metrics: MetricsWriter | None
    result: TrainResult
    sizes: dict[str, Any]
    resumed_from: Path | None = None
    log: Callable[[str], None] = print
    main_process: bool = True
    wrapped: nn.Module | None = None

    @property
    def stepping_model(self) -> nn.Module:
        """The model that training steps run: the ``wrap_model`` wrapper, or the model."""
        return self.wrapped if self.wrapped is not None else self.model

    dist: distributed.Dist = field(default_factory=distributed.Dist)
    #: ``training.eval_tasks``' scorer (None: no lm-eval tasks at evaluations).
    tasks: TaskScorer | None = None

    @property
    def checkpoints(self) -> Path:
        """The folder of this run's checkpoints."""
        return self.out / "checkpoints"

    def say(self, line: str) -> None:
        """Log ``line`` above the progress bar (``print`` would go through it)."""
        (tqdm.write if self.log is print else self.log)(line)


def choose_threads(cfg: TrainConfig, log: Callable[[str], None] = print) -> int:
    """Torch CPU threads for the run: ``training.num_threads``; else, when resuming, the count
    the checkpoint recorded (the same count gives the same float sums, so the resumed run
    equals an uninterrupted one); else :func:`~loraq.core.probes.auto_threads`."""
    t = cfg.training
    recorded = ckpt.recorded_threads(
        ckpt.checkpoint_to_resume(t, Path(t.output_dir) / "checkpoints")
    )
    if t.num_threads:
        if recorded and recorded != t.num_threads:
            log(
                f"warning: training.num_threads is {t.num_threads} but the checkpoint ran with "
                f"{recorded}: the resumed losses may differ from an uninterrupted run's"
            )
        return t.num_threads
    return recorded or max(1, auto_threads() // distributed.ranks_on_this_machine())


def setup(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    main_process: bool = True,
    dist: distributed.Dist | None = None,
) -> Session:
    """Data, model, optimizer, schedule, resumed state and metrics file of a run (see the module
    docstring for ``wrap_model`` and ``main_process``). Sets torch's thread count.

    ``dist``: this rank's place in a torchrun job (:func:`loraq.train.distributed.setup`); the
    model is wrapped in DDP / FSDP2, only rank 0 writes, the stream yields this rank's share.
    """
    dist = dist or distributed.Dist()
    main_process = main_process and dist.is_main
    t = cfg.training
    tasks = task_scorer(cfg, dist)  # before anything is written: lm-eval and the task names
    out = Path(t.output_dir)
    threads = choose_threads(cfg, log)
    torch.set_num_threads(threads)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "checkpoints"):
            ckpt.remove_orphans(folder)  # left by a run killed while writing
        ckpt.refuse_to_overwrite(t, out / "checkpoints")  # now, not after loading the model
    distributed_checkpoint.refuse_other_world_size(t, out / "checkpoints", dist)
    seed_everything(t.seed)

    tokenizer = load_tokenizer(cfg.model.path)
    tokenize = tokenize_pairs if learns_preferences(cfg) else tokenize_records
    data = load_datasets(cfg, tokenizer, tokenize)
    if cfg.data.labels is None and data.labels is not None:
        cfg.data.labels = data.labels  # the resolved config records the label order
    log(
        f"threads: {threads}  data: {data.train_records} train / {data.eval_records} eval records"
        + (f"  labels {data.labels}" if data.labels else "")
        + (f"  ({len(data.train)} packed blocks)" if cfg.data.packing else "")
    )

    device = resolve_device(t.device)
    model, new_modules = load_model(cfg.model.path, cfg.model.task, data.labels, data.pad_id)
    model = prepare_model(model.to(device), cfg, new_modules)  # quantizes on the device
    model.train()
    sizes = count_params(model)
    log(
        f"model: {type(model).__name__} ({_method_text(cfg, device)}) on {device}  "
        f"trainable {sizes['trainable']:,} / {sizes['total']:,} params"
    )
    wrapped = wrap_model(model) if wrap_model is not None else None
    if dist.enabled:  # DDP wraps; FSDP2 shards in place (then the model is its own wrapper)
        log(f"distributed: {dist.strategy} over {dist.world_size} ranks")
        wrapped = distributed.wrap(model if wrapped is None else wrapped, dist, device)
        seed_everything(distributed.rank_seed(t.seed, dist.rank))  # each rank its own dropout

    total_steps = total_steps_of(t, len(data.train))
    optimizer = make_optimizer(wrapped if wrapped is not None else model, t)
    scheduler = make_scheduler(optimizer, t, total_steps)

    state, resumed_from = _resume(cfg, out, model, optimizer, scheduler, log, main_process, dist)
    state.num_threads, state.world_size = threads, dist.world_size
    metrics = None
    if main_process:
        save_config(cfg, out / "config.yaml")
        metrics = MetricsWriter(out / "metrics.jsonl", state.step if resumed_from else None)
    # Distributed: this rank's share of the batches of one process with N x batch_size.
    stream = micro_batches(
        data.train, t.batch_size, t.seed, data.pad_id, state.epoch, state.batch_in_epoch,
        rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    result = TrainResult(output_dir=out, steps=state.step, total_steps=total_steps)
    result.metric, result.num_threads = main_metric(cfg.model.task)[0], threads
    return Session(
        cfg, out, device, tokenizer, data, model, optimizer, scheduler, state, stream, metrics,
        result, sizes, resumed_from, log, main_process, wrapped, dist, tasks,
    )  # fmt: skip


def task_scorer(cfg: TrainConfig, dist: distributed.Dist) -> TaskScorer | None:
    """The scorer of ``training.eval_tasks`` (None when there are none); lm-eval missing, an
    unknown task or a torchrun job is one error naming the key."""
    t = cfg.training
    if not t.eval_tasks:
        return None
    if dist.enabled:
        raise ConfigError("training.eval_tasks runs in a single process, not under torchrun")
    return TaskScorer(t.eval_tasks, t.eval_include_path, t.eval_task_limit, eval_batch_size(cfg))


def eval_batch_size(cfg: TrainConfig) -> int:
    """Examples per eval batch: ``training.eval_batch_size``, else twice ``batch_size``."""
    return cfg.training.eval_batch_size or 2 * cfg.training.batch_size


def learns_preferences(cfg: TrainConfig) -> bool:
    """True when ``training.method`` trains on preference pairs (``dpo``, ``orpo``)."""
    return cfg.training.method in PREFERENCE_METHODS


def _method_text(cfg: TrainConfig, device: torch.device) -> str:
    t = cfg.training
    how = t.method if t.method == "full" else f"lora r={cfg.lora.r}"
    if learns_preferences(cfg):
        loss = f"{t.loss_type}, " if t.method == "dpo" else ""
        how = f"{t.method} ({loss}beta {t.beta}), {how}"
    if t.method in ADAPTER_METHODS and cfg.lora.quant:
        how += f", {cfg.lora.quant} base"
    return how + f", {str(run_compute_dtype(cfg, device)).removeprefix('torch.')} compute"


def run_compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype a run computes in: the ``lora`` section's ``compute_dtype`` (``auto`` resolved
    for ``device``) for LoRA, float32 for full fine-tuning. Below float32 the forward runs under
    autocast, with float32 master weights, optimizer state and loss."""
    if cfg.training.method not in ADAPTER_METHODS:
        return torch.float32
    return resolve_compute_dtype(cfg.lora.compute_dtype, device)


def _resume(cfg, out, model, optimizer, scheduler, log, main_process, dist):
    """The checkpoint's state (and its path) when resuming; a fresh state otherwise.
    Distributed: rank 0 alone looks at the folder, reads the checkpoint and broadcasts it."""
    found = ckpt.checkpoint_to_resume(cfg.training, out / "checkpoints") if dist.is_main else None
    found = distributed_checkpoint.broadcast_object(found, dist)
    if found is None:
        if main_process:
            ckpt.remove_stale_checkpoints(cfg.training, out / "checkpoints", log)
        return ckpt.TrainState(), None
    if main_process and (out / "config.yaml").is_file():
        ckpt.warn_if_config_changed(out / "config.yaml", cfg, tqdm.write)
    if dist.enabled:
        state = distributed_checkpoint.load_checkpoint(found, model, optimizer, scheduler, dist)
    else:
        state = ckpt.load_checkpoint(found, model, optimizer, scheduler)
    log(f"resumed from {found} at step {state.step}")
    return state, found


# ----------------------------------------------------------------------------- one step
@dataclass
class StepStats:
    """One optimizer step: its loss (summed over micro-batches), non-pad tokens, lr and time;
    ``rewards``: the step's reward means (preference methods, see :mod:`.preference`)."""

    loss: float
    tokens: int
    lr: float
    seconds: float
    rewards: dict[str, float] = field(default_factory=dict)


def train_step(session: Session) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``session.state``.

    Raises ``FloatingPointError`` when the loss is not finite (nothing is updated then).
    """
    t, state, model = session.cfg.training, session.state, session.stepping_model
    tick = time.time()
    loss_sum, tokens = 0.0, 0
    pairs = preference.RewardSums() if learns_preferences(session.cfg) else None
    for i in range(t.grad_accum):
        micro = next(session.stream)
        if pairs is not None:  # DPO / IPO: reference (adapters off) and policy; ORPO: policy
            part, n = preference.micro_step(
                model, micro, pairs, beta=t.beta, loss_type=t.loss_type, method=t.method,
                grad_accum=t.grad_accum,
                compute_dtype=run_compute_dtype(session.cfg, session.device),
                device=session.device, info=session.dist, last=i == t.grad_accum - 1,
            )  # fmt: skip
            loss_sum, tokens = loss_sum + part, tokens + n
            continue
        if session.dist.enabled:
            part, n = distributed.micro_step(
                model, micro, task=session.cfg.model.task, grad_accum=t.grad_accum,
                info=session.dist, device=session.device, last=i == t.grad_accum - 1,
            )  # fmt: skip
            loss_sum, tokens = loss_sum + part, tokens + n
            continue
        batch = {k: v.to(session.device) for k, v in micro.batch.items()}
        with autocast_for(run_compute_dtype(session.cfg, session.device), session.device):
            loss = model(**batch).loss / t.grad_accum
        loss.backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum().item())
    if session.dist.enabled:  # the global batch's loss and tokens, the same on every rank
        loss_sum, tokens = distributed.agree([loss_sum, tokens], session.dist)
        tokens = int(tokens)
    rewards = {}
    if pairs is not None:
        rewards = pairs.with_values(distributed.agree(pairs.as_list(), session.dist)).metrics()
    if not math.isfinite(loss_sum):
        raise FloatingPointError(f"loss is {loss_sum} at step {state.step + 1}; lower training.lr?")
    if t.max_grad_norm:
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, t.max_grad_norm)
    lr = session.optimizer.param_groups[0]["lr"]
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.epoch, state.batch_in_epoch = micro.epoch, micro.next_index
    state.tokens += tokens
    return StepStats(loss_sum, tokens, lr, max(time.time() - tick, 1e-9), rewards)


def log_step(session: Session, stats: StepStats) -> None:
    """Record a step: the result's per-step lists and a metrics.jsonl line."""
    result, state = session.result, session.state
    result.step_times.append(stats.seconds)
    result.step_tokens.append(stats.tokens)
    result.losses.append(stats.loss)
    if session.metrics is not None:
        global_batch = session.cfg.training.batch_size * session.dist.world_size
        n_batches = batches_per_epoch(len(session.data.train), global_batch)
        session.metrics.write(
            {
                "step": state.step,
                "epoch": round(state.epoch + state.batch_in_epoch / n_batches, 4),
                "loss": stats.loss,
                "lr": stats.lr,
                "tokens_per_s": round(stats.tokens / stats.seconds, 1),
                **stats.rewards,
            }
        )


# ----------------------------------------------------------------------------- evaluation
def evaluate_session(session: Session, step: int) -> dict[str, float]:
    """Evaluate on the eval set and score ``training.eval_tasks`` (each if the config asks),
    write the scores to metrics.jsonl and track the best value of the main metric. An eval set
    with no labelled token gives a log line and an ``eval_skipped`` line in metrics.jsonl
    (never a silently missing metric)."""
    cfg, state = session.cfg, session.state
    scores: dict[str, float] = {}
    with autocast_for(run_compute_dtype(cfg, session.device), session.device):
        if session.data.eval or wants_eval(cfg):
            scores = _eval_set_scores(session)
            if not scores:
                session.say(f"step {step}: eval skipped: {NO_EVAL_TOKENS}")
                if session.metrics is not None:
                    session.metrics.write({"step": step, "eval_skipped": NO_EVAL_TOKENS})
        if session.tasks is not None:
            task_scores = session.tasks(session.model, session.tokenizer)
            scores |= {TASK_PREFIX + name: value for name, value in task_scores.items()}
    if not scores:
        return scores
    if session.metrics is not None:
        session.metrics.write({"step": step, **scores})
    name, higher_better = main_metric(cfg.model.task)
    value = scores.get(name)
    best = state.best_metric
    better = value is not None and (
        best is None or (value > best if higher_better else value < best)
    )
    if step > 0 and better:
        state.best_metric, state.best_step = value, step
    return scores


def _eval_set_scores(session: Session) -> dict[str, float]:
    cfg, data = session.cfg, session.data
    if learns_preferences(cfg):
        t = cfg.training
        return preference.evaluate_pairs(
            session.model, data.eval, eval_batch_size(cfg), data.pad_id, t.beta, t.loss_type,
            t.method,
        )  # fmt: skip
    return evaluate(session.model, data.eval, cfg.model.task, eval_batch_size(cfg), data.pad_id)


def wants_eval(cfg: TrainConfig) -> bool:
    """True when the config asks for an eval set (``data.eval`` or ``data.eval_split``)."""
    return bool(cfg.data.eval) or cfg.data.eval_split > 0


def evaluates(session: Session) -> bool:
    """True when the run evaluates: an eval set, or ``training.eval_tasks``."""
    return bool(session.data.eval or wants_eval(session.cfg) or session.tasks is not None)


# ----------------------------------------------------------------------------- checkpoints
def save_session_checkpoint(session: Session) -> Path | None:
    """Write a resumable checkpoint of the session now (nothing off the main process;
    distributed: every rank must call it, rank 0 writes)."""
    t = session.cfg.training
    if session.dist.enabled:
        path = distributed_checkpoint.save_checkpoint(
            session.checkpoints, session.model, session.optimizer, session.scheduler,
            session.state, t.keep_checkpoints, session.dist,
        )  # fmt: skip
        session.result.checkpoint = path or session.result.checkpoint
        return path
    if not session.main_process:
        return None
    session.result.checkpoint = ckpt.save_checkpoint(
        session.checkpoints,
        session.model,
        session.optimizer,
        session.scheduler,
        session.state,
        t.keep_checkpoints,
    )
    return session.result.checkpoint


# ----------------------------------------------------------------------------- finish
def finish(session: Session, started: float) -> TrainResult:
    """Write the outputs (adapter or model, loss.png) and fill in the result; log the summary.

    The final eval has run already (see :func:`train`); ``started`` is the run's start time.
    """
    cfg, result, state, out = session.cfg, session.result, session.state, session.out
    with distributed.full_trainable(session.model, session.dist):  # FSDP2: the whole adapter
        if session.main_process:
            folder = out / ("adapter" if cfg.training.method in ADAPTER_METHODS else "model")
            save_trained(session.model, cfg, session.tokenizer, folder)
    if session.main_process:
        plot_metrics(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=out.name)
    result.steps = state.step
    result.best_metric, result.best_step = state.best_metric, state.best_step
    sizes = session.sizes
    result.trainable_params, result.total_params = sizes["trainable"], sizes["total"]
    result.weight_bytes, result.weight_parts = sizes["bytes"], sizes["parts"]
    result.peak_rss_bytes = peak_rss_bytes()
    if session.device.type == "cuda":
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(session.device)
    result.wall_time_s = time.time() - started
    session.log(result.summary())
    return result


# ----------------------------------------------------------------------------- the run
def train(
    cfg: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune per ``cfg`` and write the run folder; returns a :class:`TrainResult`.

    ``on_step(step, loss)`` is called after every optimizer step (a hook for tests and
    notebooks; raising from it stops the run as a crash would). ``log`` receives the
    human-readable lines (eval results, the summary). Torch's thread count is restored after.
    """
    started = time.time()
    threads = torch.get_num_threads()
    t = cfg.training
    dist, _ = distributed.setup(t.distributed, resolve_device(t.device), t.distributed_timeout)
    try:
        session = setup(cfg, log if dist.is_main else _silent, dist=dist)
        try:
            run_steps(session, on_step)
        finally:
            if session.metrics is not None:
                session.metrics.close()
        return finish(session, started)
    finally:
        distributed.teardown(dist)
        torch.set_num_threads(threads)


def _silent(line: str) -> None:
    """The log of ranks other than 0."""


def run_steps(session: Session, on_step: Callable[[int, float], None] | None = None) -> None:
    """Eval before, the steps (with their evals, checkpoints and Ctrl-C), eval after."""
    t, state, result = session.cfg.training, session.state, session.result
    # An eval set that was asked for is evaluated even when empty, so the log and metrics.jsonl
    # say that there is no metric rather than leave it out silently.
    total, has_eval = result.total_steps, evaluates(session)
    if t.eval_before and has_eval and session.resumed_from is None:
        result.eval_before = evaluate_session(session, 0)
        if result.eval_before:
            session.log(f"eval before training: {format_metrics(result.eval_before)}")
    bar = tqdm(
        total=total, initial=state.step, desc="train", unit="step",
        disable=not t.progress or not session.main_process,
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    smooth_loss = None
    try:
        dist = session.dist  # distributed: SIGTERM too, and the ranks agree on when to stop
        stopper = StopSignals(dist.rank) if dist.enabled else GracefulInterrupt()
        with stopper as interrupt:
            while state.step < total:
                stats = train_step(session)
                log_step(session, stats)
                smooth_loss = (
                    stats.loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * stats.loss
                )
                tok_s = f"{stats.tokens / stats.seconds:,.0f}"
                bar.set_postfix(loss=f"{smooth_loss:.4f}", lr=f"{stats.lr:.2e}", tok_s=tok_s)
                bar.update(1)
                if (
                    has_eval
                    and t.eval_every
                    and state.step % t.eval_every == 0
                    and state.step < total
                ):
                    scores = evaluate_session(session, state.step)
                    if scores:
                        session.say(f"step {state.step}: eval {format_metrics(scores)}")
                saved = bool(t.save_every and state.step % t.save_every == 0)
                if saved:
                    save_session_checkpoint(session)
                if on_step is not None:
                    on_step(state.step, stats.loss)
                stop = distributed.any_rank(interrupt.requested, dist)
                if stop and state.step < total:
                    result.interrupted = True
                    if not saved:
                        save_session_checkpoint(session)
                    break
    finally:
        bar.close()
    result.steps = state.step
    if has_eval and not result.interrupted:
        result.eval_after = evaluate_session(session, state.step)
        if result.eval_after:
            session.log(f"eval after training:  {format_metrics(result.eval_after)}")
