"""The training loop, readable top to bottom: :func:`train` does one run from a TrainConfig.

    tokenizer + data  ->  model (+ LoRA / QLoRA)  ->  AdamW + schedule  ->  resume?
    ->  eval before  ->  steps (grad accumulation, clip, log, eval, checkpoint, Ctrl-C)
    ->  eval after  ->  adapter, metrics.jsonl, loss.png, summary

The helpers it uses (:func:`load_model`, :func:`prepare_model`, :func:`make_optimizer`,
:func:`make_scheduler`, :func:`evaluate`) are public and compose on their own, for a loop of
your own.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from loraq.io.peft_format import BASE_OPTIONS
from loraq.train import checkpoint as ckpt
from loraq.train.config import ConfigError, TrainConfig, TrainingConfig, save_config
from loraq.train.data import (
    IGNORE_INDEX,
    Datasets,
    batches_per_epoch,
    eval_batches,
    load_datasets,
    micro_batches,
)
from loraq.train.metrics import MetricsWriter, plot_metrics, read_metrics

#: File, inside a saved adapter folder, with the resolved config of the run that trained it.
RUN_CONFIG_NAME = "loraq_train.yaml"
#: Classification heads of AutoModelForSequenceClassification models, by attribute name.
HEAD_NAMES = ("classifier", "score")


# ----------------------------------------------------------------------------- model loading
def resolve_model_path(path: str) -> Path:
    """A model folder from ``model.path``: a local folder, or ``pkg:NAME`` (a package's model)."""
    if path.startswith("pkg:"):
        name = path[4:]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise ConfigError(
                f"model.path '{path}': Python package '{name}' is not installed"
            ) from None
        getter = getattr(module, "get_model_path", None)
        folder = getter() if callable(getter) else getattr(module, "MODEL_DIR", None)
        if folder is None:
            raise ConfigError(f"model.path '{path}': package '{name}' has no get_model_path()")
        path = str(folder)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path '{folder}' is not a folder (expected a local HF model)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path '{folder}' has no config.json: not a Hugging Face model")
    return folder


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a local model folder."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(resolve_model_path(str(path))))


def load_model(
    path: str | Path, task: str, labels: list[str] | None = None, pad_id: int | None = None
) -> tuple[nn.Module, list[str]]:
    """Load a float32 model for ``task``; return it and the modules that were newly initialised.

    For ``seq-cls`` the head gets ``len(labels)`` outputs and the label names; modules whose
    weights were missing from the checkpoint (the head, usually) are returned so that the
    caller can train them in full.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = resolve_model_path(str(path))
    with quiet_transformers():
        if task == "seq-cls":
            if not labels:
                raise ConfigError("seq-cls needs label names (data.labels or the training file)")
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                dtype=torch.float32,
                output_loading_info=True,
            )
        elif task == "causal-lm":
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, output_loading_info=True
            )
        else:
            raise ConfigError(f"model.task must be 'causal-lm' or 'seq-cls', got {task!r}")
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())})
    return model, new_modules


def _head_name(model: nn.Module) -> str | None:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def lora_settings(cfg: TrainConfig, model: nn.Module, new_modules: list[str]) -> dict[str, Any]:
    """The ``lora`` section completed for this model: newly initialised modules (a seq-cls
    head) are added to ``modules_to_save`` so they train in full and are saved with the adapter.
    """
    settings = dict(cfg.lora)
    saved = list(settings.get("modules_to_save") or [])
    wanted = list(new_modules)
    head = _head_name(model) if cfg.model.task == "seq-cls" else None
    if head is not None:
        wanted.append(head)
    for name in wanted:
        covered = any(name == s or name.endswith("." + s) or s.startswith(name) for s in saved)
        if not covered:
            saved.append(name)
    if saved:
        settings["modules_to_save"] = saved
    return settings


def prepare_model(model: nn.Module, cfg: TrainConfig, new_modules: list[str]) -> nn.Module:
    """Make ``model`` trainable per ``cfg``: LoRA/QLoRA via :func:`loraq.apply`, or all weights.

    Updates ``cfg.lora`` with the settings actually used (e.g. the seq-cls head added to
    ``modules_to_save``) so the saved config says what ran.
    """
    if cfg.training.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"training.gradient_checkpointing: {type(model).__name__} does not support it"
            )
        kwargs = {"use_reentrant": False}  # works with a frozen base and no input grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if cfg.training.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import loraq

    cfg.lora = lora_settings(cfg, model, new_modules)
    try:
        model = loraq.apply(model, cfg.lora_config())
    except ValueError as err:
        raise ConfigError(f"lora: {err}") from None
    return model


def count_params(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters, weight bytes (quantized weights at their real size) and,
    for adapted models, bytes per part (adapters, modules_to_save, base_dense, base_quantized)."""
    if hasattr(model, "loraq_configs"):
        import loraq

        s = loraq.summary(model)
        return {
            "trainable": s.trainable_params,
            "total": s.total_params,
            "bytes": s.total_bytes,
            "parts": dict(s.bytes),
        }
    params = list(model.parameters())
    tensors = params + list(model.buffers())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "parts": {},
    }


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter has requires_grad (check lora.targets)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(0.9, 0.999))


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


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; other names are passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[dict[str, Any]], task: str, batch_size: int, pad_id: int
) -> dict[str, float]:
    """Eval metrics over ``examples``.

    ``seq-cls``: ``eval_loss`` (mean cross-entropy) and ``eval_accuracy``. ``causal-lm``:
    ``eval_loss`` (mean over all labelled tokens) and ``eval_perplexity``.
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


# ----------------------------------------------------------------------------- Ctrl-C
class GracefulInterrupt:
    """Context manager: the first Ctrl-C (SIGINT) asks the loop to checkpoint and stop after the
    current step; a second one aborts at once with ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def handler(self, signum: int, frame: Any) -> None:
        """The SIGINT handler."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort)")

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    """What a run did; also printed as the final summary."""

    output_dir: Path
    steps: int
    total_steps: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    metric: str = ""
    best_metric: float | None = None
    best_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    weight_bytes: int = 0
    weight_parts: dict[str, int] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    wall_time_s: float = 0.0
    checkpoint: Path | None = None
    # Per optimizer step of this session: seconds (forward, backward, clip, optimizer; not eval
    # or checkpoints) and non-pad tokens. ``loraq compare`` takes medians and throughput here.
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """The human-readable end-of-run summary."""
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        lines = [
            "── loraq train summary " + "─" * 38,
            f"steps              {self.steps} / {self.total_steps}"
            + ("  (interrupted)" if self.interrupted else ""),
            f"trainable params   {self.trainable_params:,} / {self.total_params:,} ({pct:.2f}%)",
            f"weight bytes       {self.weight_bytes / 2**20:.2f} MiB"
            + (
                "  ("
                + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.weight_parts.items())
                + ")"
                if self.weight_parts
                else ""
            ),
            f"peak memory (RSS)  {self.peak_rss_bytes / 2**20:.1f} MiB"
            + (f"  (GPU {self.peak_gpu_bytes / 2**20:.1f} MiB)" if self.peak_gpu_bytes else ""),
            f"wall time          {self.wall_time_s:.1f} s",
        ]
        if self.eval_before:
            lines.append(f"eval before        {format_metrics(self.eval_before)}")
        if self.eval_after:
            lines.append(f"eval after         {format_metrics(self.eval_after)}")
        if self.best_metric is not None:
            name = self.metric.removeprefix("eval_")
            lines.append(f"best eval {name:<8} {self.best_metric:.4f} (step {self.best_step})")
        lines.append(f"output             {self.output_dir}")
        if self.interrupted and self.checkpoint is not None:
            lines.append(f"checkpoint         {self.checkpoint}  (continue with --resume)")
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``resource.getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing any older one."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def save_trained(model: nn.Module, cfg: TrainConfig, tokenizer, folder: Path) -> Path:
    """Write the result atomically: the adapter in PEFT layout (``method: lora``) or the whole
    model and tokenizer (``method: full``), plus the run's config as ``loraq_train.yaml``."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.training.method == "lora":
        import loraq

        loraq.save_adapter(model, tmp)
    else:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    save_config(cfg, tmp / RUN_CONFIG_NAME)
    _replace_dir(tmp, folder)
    return folder


def available_cpus() -> int:
    """CPUs this process may run on (respects ``taskset``/cgroups affinity where available)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def auto_threads() -> int:
    """Threads for ``training.num_threads: null``: the CPUs this process may use, less those
    that other work keeps busy (1-minute load average), at least 1.

    Oversubscribed CPU threads spin at every parallel region and can make a step several times
    slower than one thread would; on an idle machine this is simply :func:`available_cpus`.
    """
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    busy = load * cpus / (os.cpu_count() or cpus)
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def resume_checkpoint(
    t: TrainingConfig, folder: Path, log: Callable[[str], None] = print
) -> Path | None:
    """The checkpoint to resume from per ``training.resume`` (None: start afresh).

    Starting afresh removes old checkpoints in ``folder`` so they cannot mix with the new run's.
    """
    found = ckpt.list_checkpoints(folder)
    if t.resume is True:
        if found:
            return found[-1]
        log(f"resume: no checkpoint in {folder}; starting from scratch")
    elif isinstance(t.resume, str):
        return Path(t.resume)
    if found:
        log(
            f"starting afresh: removing {len(found)} old checkpoint(s) in {folder} "
            "(pass --resume to continue from them instead)"
        )
        for old in found:
            shutil.rmtree(old)
    return None


def _warn_if_config_changed(previous: Path, cfg: TrainConfig) -> None:
    import yaml

    old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
    new = cfg.to_dict()
    changed = [
        f"{s}.{k}"
        for s in ("model", "data", "lora")
        for k in set(old.get(s) or {}) | set(new.get(s) or {})
        if (old.get(s) or {}).get(k) != (new.get(s) or {}).get(k)
    ]
    if changed:
        tqdm.write(f"warning: resuming with changed settings: {', '.join(sorted(changed))}")


def train(
    cfg: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune per ``cfg`` and write the run folder; returns a :class:`TrainResult`.

    ``on_step(step, loss)`` is called after every optimizer step (a hook for tests and
    notebooks; raising from it stops the run as a crash would). ``log`` receives the
    human-readable lines (eval results, the summary).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.training.num_threads or auto_threads())
    try:
        return _train(cfg, on_step, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, on_step, log) -> TrainResult:
    t0 = time.time()
    t = cfg.training
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(t.seed)

    # 1. tokenizer and data
    tokenizer = load_tokenizer(cfg.model.path)
    data: Datasets = load_datasets(cfg, tokenizer)
    if cfg.data.labels is None and data.labels is not None:
        cfg.data.labels = data.labels  # the resolved config records the label order
    log(
        f"threads: {torch.get_num_threads()}  "
        f"data: {data.train_records} train / {data.eval_records} eval records"
        + (f"  labels {data.labels}" if data.labels else "")
        + (f"  ({len(data.train)} packed blocks)" if cfg.data.packing else "")
    )

    # 2. model, with LoRA / QLoRA (or all weights trainable)
    device = resolve_device(t.device)
    model, new_modules = load_model(cfg.model.path, cfg.model.task, data.labels, data.pad_id)
    model = prepare_model(model.to(device), cfg, new_modules)  # quantizes on the device
    model.train()
    sizes = count_params(model)
    how = t.method if t.method == "full" else f"lora r={cfg.lora.get('r', 8)}"
    if t.method == "lora" and cfg.lora.get("quant"):
        how += f", {cfg.lora['quant']} base"
    log(
        f"model: {type(model).__name__} ({how}) on {device}  "
        f"trainable {sizes['trainable']:,} / {sizes['total']:,} params"
    )

    # 3. optimizer and schedule
    total_steps = total_steps_of(t, len(data.train))
    optimizer = make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t, total_steps)

    # 4. resume, or start afresh
    state = ckpt.TrainState()
    checkpoints = out / "checkpoints"
    resume_from = resume_checkpoint(t, checkpoints, log)
    if resume_from is not None:
        if (out / "config.yaml").is_file():
            _warn_if_config_changed(out / "config.yaml", cfg)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        log(f"resumed from {resume_from} at step {state.step}")
    save_config(cfg, out / "config.yaml")
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=state.step if resume_from else None)

    metric_name, higher_better = main_metric(cfg.model.task)
    eval_bs = t.eval_batch_size or 2 * t.batch_size
    result = TrainResult(
        output_dir=out, steps=state.step, total_steps=total_steps, interrupted=False
    )
    result.metric = metric_name

    def run_eval(step: int) -> dict[str, float]:
        """Evaluate, log to metrics.jsonl, and track the best value of the main metric."""
        scores = evaluate(model, data.eval, cfg.model.task, eval_bs, data.pad_id)
        if scores:
            metrics.write({"step": step, **scores})
            value = scores[metric_name]
            better = state.best_metric is None or (
                value > state.best_metric if higher_better else value < state.best_metric
            )
            if better and step > 0:
                state.best_metric, state.best_step = value, step
        return scores

    # 5. the untrained baseline
    if t.eval_before and data.eval and resume_from is None:
        result.eval_before = run_eval(0)
        log(f"eval before training: {format_metrics(result.eval_before)}")

    # 6. the loop
    stream = micro_batches(
        data.train, t.batch_size, t.seed, data.pad_id, state.epoch, state.batch_in_epoch
    )
    n_batches = batches_per_epoch(len(data.train), t.batch_size)
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not t.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    say = tqdm.write if log is print else log  # print above the progress bar, not through it
    smooth_loss = None
    tick, tick_tokens = time.time(), 0
    try:
        with GracefulInterrupt() as interrupt:
            while state.step < total_steps:
                step_loss = 0.0
                for _ in range(t.grad_accum):
                    epoch, next_index, batch = next(stream)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    loss = model(**batch).loss / t.grad_accum
                    loss.backward()
                    step_loss += loss.item()
                    tick_tokens += int(batch["attention_mask"].sum().item())
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"loss is {step_loss} at step {state.step + 1}; lower training.lr?"
                    )
                if t.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], t.max_grad_norm
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.epoch, state.batch_in_epoch = epoch, next_index
                state.tokens += tick_tokens

                elapsed = max(time.time() - tick, 1e-9)
                tokens_per_s = tick_tokens / elapsed
                result.step_times.append(elapsed)
                result.step_tokens.append(tick_tokens)
                result.losses.append(step_loss)
                smooth_loss = (
                    step_loss if smooth_loss is None else 0.9 * smooth_loss + 0.1 * step_loss
                )
                metrics.write(
                    {
                        "step": state.step,
                        "epoch": round(epoch + next_index / n_batches, 4),
                        "loss": step_loss,
                        "lr": lr,
                        "tokens_per_s": round(tokens_per_s, 1),
                    }
                )
                bar.set_postfix(
                    loss=f"{smooth_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}"
                )
                bar.update(1)

                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
                    scores = run_eval(state.step)
                    if scores:
                        say(f"step {state.step}: eval {format_metrics(scores)}")
                if t.save_every and state.step % t.save_every == 0:
                    result.checkpoint = ckpt.save_checkpoint(
                        checkpoints, model, optimizer, scheduler, state, t.keep_checkpoints
                    )
                if on_step is not None:
                    on_step(state.step, step_loss)
                if interrupt.requested and state.step < total_steps:
                    result.interrupted = True
                    if not (t.save_every and state.step % t.save_every == 0):  # not just saved
                        result.checkpoint = ckpt.save_checkpoint(
                            checkpoints, model, optimizer, scheduler, state, t.keep_checkpoints
                        )
                    break
                tick, tick_tokens = time.time(), 0
        bar.close()

        # 7. final eval, outputs, summary
        result.steps = state.step
        if data.eval and not result.interrupted:
            result.eval_after = run_eval(state.step)
            log(f"eval after training:  {format_metrics(result.eval_after)}")
    finally:
        bar.close()
        metrics.close()
    save_trained(model, cfg, tokenizer, out / ("adapter" if t.method == "lora" else "model"))
    plot_metrics(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=out.name)
    result.best_metric, result.best_step = state.best_metric, state.best_step
    result.trainable_params, result.total_params = sizes["trainable"], sizes["total"]
    result.weight_bytes, result.weight_parts = sizes["bytes"], sizes["parts"]
    result.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
    result.wall_time_s = time.time() - t0
    log(result.summary())
    return result


# ----------------------------------------------------------------------------- inference
def read_run_config(folder: str | Path) -> TrainConfig | None:
    """The config a loraq run saved next to its adapter (``loraq_train.yaml``), or None."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    import yaml

    from loraq.train.config import from_dict

    return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def attach_adapter(
    model: nn.Module, adapter: str | Path, run: TrainConfig | None, dense_base: bool = False
) -> nn.Module:
    """Load ``adapter`` onto ``model``. When the run trained it over a quantized base (QLoRA)
    the base is quantized the same way first, so eval sees what training saw; ``dense_base``
    skips that and uses the float base instead."""
    import loraq
    from loraq.io import read_adapter
    from loraq.io.peft_format import load_adapter_tensors

    quant = {k: run.lora[k] for k in BASE_OPTIONS if k in run.lora} if run is not None else {}
    if dense_base or not quant.get("quant"):
        return loraq.load_adapter(model, adapter)
    config, tensors, weights = read_adapter(adapter)
    loraq.apply(model, config.replace(**quant))
    load_adapter_tensors(model, "default", tensors, source=str(weights))
    return model


def load_trained(
    model_path: str | None = None,
    adapter: str | Path | None = None,
    task: str | None = None,
    dense_base: bool = False,
    device: str = "auto",
) -> tuple[nn.Module, Any, TrainConfig | None]:
    """Load a model for eval/generate/merge: ``(model, tokenizer, run config or None)``.

    ``adapter`` is an adapter folder (PEFT layout; a loraq run also leaves its config there, so
    the base model, task and labels are found without being named) or a full model folder
    written by ``method: full``. Without ``adapter`` the plain ``model_path`` model is loaded.
    A QLoRA adapter is loaded over the same quantized base it was trained with, unless
    ``dense_base``. The model is moved to ``device`` (see :func:`resolve_device`).
    """
    import json

    run = None
    is_full = False
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_dir():
            raise ConfigError(f"adapter folder '{adapter}' does not exist")
        run = read_run_config(adapter)
        is_full = (adapter / "config.json").is_file() and not (
            adapter / "adapter_config.json"
        ).is_file()
        if not is_full and not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"'{adapter}' holds no adapter_config.json: not an adapter folder")
        if is_full:
            model_path = str(adapter)
        elif model_path is None:
            model_path = run.model.path if run else None
            if model_path is None:
                peft = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
                model_path = peft.get("base_model_name_or_path")
        if task is None and run is not None:
            task = run.model.task
        elif task is not None and run is not None and task != run.model.task:
            raise ConfigError(f"'{adapter}' was trained for task {run.model.task}, not {task}")
    if not model_path:
        raise ConfigError("no base model: pass --model (the adapter does not name its base)")
    task = task or "causal-lm"
    tokenizer = load_tokenizer(model_path)
    labels = run.data.labels if run is not None and task == "seq-cls" else None
    if task == "seq-cls" and not labels:
        from transformers import AutoConfig

        with quiet_transformers():
            hf_config = AutoConfig.from_pretrained(str(resolve_model_path(model_path)))
        labels = [hf_config.id2label[i] for i in sorted(hf_config.id2label)]
    from loraq.train.data import pad_id_of

    model, _ = load_model(model_path, task, labels, pad_id_of(tokenizer))
    if adapter is not None and not is_full:
        try:
            model = attach_adapter(model, adapter, run, dense_base)
        except ValueError as err:  # loraq.io.FormatError and LoraConfig errors
            raise ConfigError(f"cannot load adapter '{adapter}' onto {model_path}: {err}") from None
    model.to(resolve_device(device)).eval()
    return model, tokenizer, run
