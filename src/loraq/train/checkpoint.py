"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000120/`` holding

* ``trainable.safetensors`` — every parameter with ``requires_grad`` (adapters, saved heads),
* ``resume_state.json`` + ``resume_state.safetensors`` — the optimizer's and the scheduler's
  ``state_dict()`` and the Python, NumPy and torch (and CUDA) random states: the structure and
  plain values as JSON, the tensors (AdamW's moments, the torch RNG state) as safetensors
  (:mod:`loraq.io.tensor_tree`); under torchrun also every rank's random states (``rank_rng``),
* ``state.json`` — the step, the data position (epoch and next batch within it), the best eval
  metric so far and the torch thread count the run used.

No file is pickled: everything is read back through JSON and safetensors, so loading a
checkpoint cannot run code. The folder is written through :func:`loraq.io.safe.staged_folder`
(under a temporary name in the same parent, then renamed into place), so a crash (even
``kill -9``) never leaves a half-written checkpoint that looks complete; the newest complete
one stays usable, and :func:`~loraq.io.safe.remove_orphans` clears what a killed run left.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..io.safe import (
    FormatError,
    read_safetensors,
    remove_folder,
    remove_orphans,
    staged_folder,
)
from ..io.tensor_tree import load_tree, save_tree

if TYPE_CHECKING:
    from loraq.train.schema import TrainConfig, TrainingConfig

PREFIX = "step-"
#: The optimizer, scheduler and RNG states: structure (JSON) and tensors (safetensors).
RESUME_JSON, RESUME_TENSORS = "resume_state.json", "resume_state.safetensors"


@dataclass
class TrainState:
    """Where training stands: what a checkpoint needs besides tensors.

    Attributes:
        step: optimizer steps done.
        epoch: epoch of the next micro-batch.
        batch_in_epoch: index (within ``epoch``) of the next micro-batch.
        best_metric: best eval value so far (None before any eval).
        best_step: step at which ``best_metric`` was measured.
        tokens: non-padding tokens seen in training so far.
        num_threads: torch CPU threads the run used (None in checkpoints of older versions); a
            resumed run reuses it so its float sums match an uninterrupted run's.
        world_size: ranks the run used (1: one process; None in checkpoints of older
            versions). ``batch_in_epoch`` counts global batches of ``world_size`` x
            ``batch_size`` examples, so a resume needs the same number of ranks.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    tokens: int = 0
    num_threads: int | None = None
    world_size: int | None = None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states as plain values and tensors (no NumPy objects)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by its name in ``model``."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep: int | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``folder/step-NNNNNN`` atomically; prune to the newest ``keep``. Returns its path.

    ``rank_rng``: every rank's :func:`rng_state` (distributed runs), kept with the rest.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder)
    final = folder / f"{PREFIX}{state.step:06d}"
    # A checkpoint of the same step from an earlier run is replaced whole.
    with staged_folder(final, replace=True) as staging:
        _write_checkpoint(staging, model, optimizer, scheduler, state, rank_rng)
    if keep:
        for stale in list_checkpoints(folder)[:-keep]:
            remove_folder(stale)
    return final


def _write_checkpoint(
    tmp: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    rank_rng: list[dict[str, Any]] | None = None,
) -> None:
    """Write the checkpoint's files into the fresh, empty folder ``tmp``."""
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    resume = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    if rank_rng is not None:
        resume["rank_rng"] = rank_rng
    save_tree(resume, tmp / RESUME_JSON, tmp / RESUME_TENSORS)
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder``, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    restore_rng: bool = True,
) -> TrainState:
    """Load a checkpoint folder into ``model``/``optimizer``/``scheduler``; return its state.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` when the checkpoint's
    trainable tensors do not match the model's (a different LoRA config or model).
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"'{path}' is not a loraq checkpoint folder (no state.json)")
    if not (path / RESUME_JSON).is_file():
        old = " (its .pt files are pickles, which loraq no longer reads)"
        raise FormatError(
            f"checkpoint '{path}' has no {RESUME_JSON}"
            + (old if (path / "optimizer.pt").exists() else "")
            + "; start afresh without --resume"
        )
    saved, _ = read_safetensors(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing = sorted(expected - set(saved))[:3]
        extra = sorted(set(saved) - expected)[:3]
        raise ValueError(
            f"checkpoint '{path}' does not fit this model's trainable parameters "
            f"(missing {missing}, unexpected {extra}); was it written with another config?"
        )
    for name, tensor in saved.items():
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"checkpoint '{path}' does not fit this model: '{name}' has shape "
                f"{tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    resume = load_tree(path / RESUME_JSON, path / RESUME_TENSORS)
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if restore_rng:
        set_rng_state(resume["rng"])
    return read_state(path)


def read_rank_rng(path: str | Path) -> list[dict[str, Any]] | None:
    """Every rank's random states saved with a checkpoint (None if it was not distributed)."""
    return load_tree(Path(path) / RESUME_JSON, Path(path) / RESUME_TENSORS).get("rank_rng")


def read_state(path: str | Path) -> TrainState:
    """The :class:`TrainState` of a checkpoint folder (its ``state.json``)."""
    data = json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))
    return TrainState(**{k: v for k, v in data.items() if k in TrainState.__dataclass_fields__})


def recorded_threads(path: str | Path | None) -> int | None:
    """The thread count a checkpoint recorded; None without one (or for an older checkpoint)."""
    if path is None or not (Path(path) / "state.json").is_file():
        return None
    return read_state(path).num_threads


def recorded_world_size(path: str | Path) -> int | None:
    """The number of ranks that wrote the checkpoint ``path``: its ``state.json``'s, or for an
    older checkpoint that lacks it, the count of its per-rank RNG states (1 if none); None
    when the folder cannot tell (no ``state.json`` or no resume state: loading it reports)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    recorded = read_state(path).world_size
    if recorded is not None:
        return recorded
    if not (path / RESUME_JSON).is_file():
        return None
    rank_rng = read_rank_rng(path)
    return len(rank_rng) if rank_rng else 1


def world_size_mismatch(path: str | Path, world_size: int) -> str | None:
    """Why ``path`` cannot be resumed on ``world_size`` ranks (None: it can).

    The data position and every rank's RNG states belong to the number of ranks that wrote the
    checkpoint; on another number the run would silently read other examples, so it is
    refused rather than reinterpreted.
    """
    recorded = recorded_world_size(path)
    if recorded is None or recorded == world_size:
        return None  # not a (readable) checkpoint: loading it reports that
    return (
        f"checkpoint '{path}' was written by {_ranks(recorded)} but this run has "
        f"{_ranks(world_size)}: resume it with --nproc {recorded} (or torchrun "
        f"--nproc_per_node {recorded}), or start afresh with --overwrite"
        if recorded > 1
        else f"checkpoint '{path}' was written by {_ranks(recorded)} but this run has "
        f"{_ranks(world_size)}: resume it without --nproc, or start afresh with --overwrite"
    )


def _ranks(n: int) -> str:
    return "1 process" if n == 1 else f"{n} ranks"


# ----------------------------------------------------------------------------- resuming
def checkpoint_to_resume(t: TrainingConfig, folder: str | Path) -> Path | None:
    """The checkpoint ``training.resume`` asks for in ``folder`` (the run's ``checkpoints/``):
    the newest for ``true``, the given path for a string; None to start afresh. Changes
    nothing on disk."""
    if t.resume is True:
        return latest_checkpoint(folder)
    if isinstance(t.resume, str):
        return Path(t.resume)
    return None


def remove_stale_checkpoints(
    t: TrainingConfig, folder: str | Path, log: Callable[[str], None] = print
) -> None:
    """Starting afresh: remove old checkpoints in ``folder`` so they cannot mix with the new
    run's (and say so)."""
    found = list_checkpoints(folder)
    if t.resume is True:
        log(f"resume: no checkpoint in {folder}; starting from scratch")
    if found:
        refuse_to_overwrite(t, folder)
        log(f"starting afresh (--overwrite): removing {len(found)} old checkpoint(s) in {folder}")
        for old in found:
            remove_folder(old)


def refuse_to_overwrite(t: TrainingConfig, folder: str | Path) -> None:
    """Raise ``ConfigError`` when starting afresh would delete checkpoints in ``folder`` that
    ``training.overwrite`` does not allow to delete."""
    from loraq.train.config import ConfigError

    found = list_checkpoints(folder)
    if found and t.resume is False and not t.overwrite:
        raise ConfigError(
            f"training.output_dir already holds {len(found)} checkpoint(s) of an earlier run "
            f"(newest: {found[-1].name}) in {folder}: pass --resume to continue from them, or "
            "--overwrite to delete them and start afresh"
        )


def warn_if_config_changed(
    previous: Path, cfg: TrainConfig, log: Callable[[str], None] = print
) -> None:
    """Warn when the model, data or lora settings differ from the run's saved config."""
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
        log(f"warning: resuming with changed settings: {', '.join(sorted(changed))}")
