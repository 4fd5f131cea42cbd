"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step-000120/`` holding

* ``trainable.safetensors`` — every parameter with ``requires_grad`` (adapters, saved heads),
* ``optimizer.pt`` / ``scheduler.pt`` — their ``state_dict()`` (``torch.save``),
* ``rng.pt`` — Python, NumPy and torch (and CUDA) random states,
* ``state.json`` — the step, the data position (epoch and next batch within it) and the best
  eval metric so far.

The folder is first written under a temporary name in the same parent and then renamed into
place, so a crash never leaves a half-written checkpoint that looks complete. Everything is read
back with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


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
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    tokens: int = 0


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states in a ``weights_only``-loadable form."""
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
) -> Path:
    """Write ``folder/step-NNNNNN`` atomically; prune to the newest ``keep``. Returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{state.step:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    if final.exists():  # a checkpoint of the same step from an earlier run: replace it
        old = folder / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep:
        for stale in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


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
    saved = load_file(str(path / "trainable.safetensors"))
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
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
