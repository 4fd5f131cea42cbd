"""Checkpoints of a run on several ranks: rank 0 reads and writes, every rank takes part.

Checkpoints keep the single-process layout (:mod:`loraq.train.checkpoint`) whatever the
strategy: FSDP2's sharded trainable parameters and optimizer state are gathered whole before
rank 0 writes, and split back into shards after rank 0 reads and broadcasts. Every rank's RNG
states travel with the checkpoint, so a resumed run continues each rank's random stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from loraq.train.distributed import Dist, full_trainable, is_dtensor, unwrap

if TYPE_CHECKING:
    from loraq.train.schema import TrainingConfig


def broadcast_object(obj: Any, info: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse_other_world_size(t: TrainingConfig, folder: Path, info: Dist) -> None:
    """Raise ``ConfigError`` on every rank when the checkpoint ``training.resume`` picks in
    ``folder`` was written by another number of ranks (rank 0 alone reads the folder)."""
    from loraq.train.checkpoint import checkpoint_to_resume, world_size_mismatch
    from loraq.train.config import ConfigError

    problem = None
    if info.is_main:
        found = checkpoint_to_resume(t, folder)
        problem = None if found is None else world_size_mismatch(found, info.world_size)
    problem = broadcast_object(problem, info)
    if problem is not None:
        raise ConfigError(problem)


def gather_rng(info: Dist) -> list[Any] | None:
    """Every rank's random-generator states, on rank 0 (None elsewhere)."""
    from loraq.train.checkpoint import rng_state

    states = [None] * info.world_size if info.is_main else None
    dist.gather_object(rng_state(), states, dst=0)
    return states


def restore_rank_rng(checkpoint: Path | None, info: Dist) -> None:
    """Give every rank its own RNG states back from rank 0's copy of ``checkpoint``.

    A checkpoint of another number of ranks never gets here (:func:`refuse_other_world_size`);
    one without them leaves the states as the checkpoint set them on rank 0 and the seed set
    them elsewhere.
    """
    from loraq.train.checkpoint import read_rank_rng, set_rng_state

    states = read_rank_rng(checkpoint) if info.is_main and checkpoint is not None else None
    if states is not None and len(states) != info.world_size:
        states = None
    if not broadcast_object(states is not None, info):
        return
    mine: list[Any] = [None]
    dist.scatter_object_list(mine, states, src=0)
    set_rng_state(mine[0])


class _StateDict:
    """An optimizer stand-in for :mod:`loraq.train.checkpoint`: gives and takes a state dict."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        """The state given to the constructor."""
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep ``state``."""
        self.state = state


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters in the order of ``optimizer.state_dict()``'s integer ids."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with FSDP2's sharded tensors gathered whole (collective).

    The result has the layout of a single process's optimizer state, so checkpoints look the
    same whichever strategy wrote them.
    """
    out = optimizer.state_dict()
    out["state"] = {
        i: {k: v.full_tensor() if is_dtensor(v) else v for k, v in entry.items()}
        for i, entry in out["state"].items()
    }
    return out


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of :func:`full_optimizer_state`: this rank's shards of the whole tensors."""
    from torch.distributed.tensor import distribute_tensor

    params = _optimizer_params(optimizer)
    sharded = {}
    for i, entry in state["state"].items():
        p = params[int(i)]
        sharded[i] = {
            k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            if is_dtensor(p) and isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    return {**state, "state": sharded}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: Any,
    keep: int | None,
    info: Dist,
) -> Path | None:
    """Every rank joins; rank 0 writes a checkpoint in the single-process layout plus every
    rank's RNG states. Returns its path on rank 0, None elsewhere."""
    from loraq.train import checkpoint as ckpt

    rngs = gather_rng(info)
    model = unwrap(model)
    with full_trainable(model, info):
        whole = full_optimizer_state(optimizer) if info.strategy == "fsdp" else None
        if not info.is_main:
            return None
        source = optimizer if whole is None else _StateDict(whole)
        return ckpt.save_checkpoint(folder, model, source, scheduler, state, keep, rngs)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: Dist
) -> Any:
    """Rank 0 reads ``path``; every rank receives the trainable parameters, optimizer and
    scheduler state and its own RNG states. Returns the checkpoint's ``TrainState``."""
    from loraq.train import checkpoint as ckpt

    captured = _StateDict()
    model = unwrap(model)
    with full_trainable(model, info):
        state = None
        if info.is_main:
            state = ckpt.load_checkpoint(path, model, captured, scheduler)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    dist.broadcast(param.data, src=0)
    main = (captured.state, scheduler.state_dict(), state) if info.is_main else None
    optimizer_state, scheduler_state, state = broadcast_object(main, info)
    if info.strategy == "fsdp":
        optimizer_state = shard_optimizer_state(optimizer_state, optimizer)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    restore_rank_rng(path, info)
    return state
