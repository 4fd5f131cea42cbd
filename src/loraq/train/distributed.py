"""Training on several processes with ``torch.distributed``: DDP or FSDP2 under torchrun.

    torchrun --nproc_per_node 2 -m loraq train my.yaml         # 2 ranks on this machine
    loraq train my.yaml --nproc 2                               # the same, launched by loraq
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST0:29500 -m loraq train my.yaml   # 2 machines

Everything here reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...):
nothing assumes one host. Only rank 0 touches ``output_dir`` (metrics, plots, checkpoints, the
adapter), and on resume rank 0 reads the checkpoint and broadcasts it, so the output folder need
not be shared between machines.

How one optimizer step maps onto N ranks, each with ``training.batch_size`` = b:

    ===========================  ==========================================================
    global micro-batch k         micro-batch k of ONE process with batch N*b (same seed;
                                 one walk, :func:`loraq.train.data.micro_batches`)
    rank r's share               examples [r*b, (r+1)*b) of it (a short last batch gives
                                 later ranks fewer, possibly none: they run one example
                                 with weight 0 so that every rank joins every collective)
    rank r's loss                sum of its per-item losses * N / items in the global batch
    gradient after the average   the single process's gradient of its mean loss, exactly
    over ranks (DDP / FSDP)      (items: labelled tokens for causal-lm, examples for seq-cls)
    ===========================  ==========================================================

So a run on N ranks follows the same trajectory as a run on one process with N times the batch,
up to float rounding, whatever the lengths of the sequences on each rank, for a model without
dropout. With dropout each rank draws its own masks (its generators are reseeded from the run's
seed and its rank, :func:`rank_seed`), so the two runs agree only within dropout's noise; a
rerun or a resume of the N-rank run repeats it exactly (every rank's RNG states are in the
checkpoint, with the number of ranks, which a resume must match).

Stopping: SIGINT or SIGTERM on any rank sets a flag; the flags are summed with the step's loss
all-reduce, so every rank sees the stop at the same step, rank 0 writes one checkpoint and all
exit cleanly. A rank that raises tears its process group down, so the other ranks' next
collective fails instead of waiting (and torchrun stops the remaining ranks). A rank whose
launcher dies gets SIGTERM (:func:`~loraq.train.signals.stop_with_parent`) and stops likewise.

FSDP2 and the 4-bit base: see :func:`shard_model`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import EXIT_INTERRUPTED
from ..layers.quantized import RECORD_PREFIX, SHARDABLE_FIELDS, QuantizedModule
from .config import ConfigError
from .data import IGNORE_INDEX, MicroBatch
from .signals import LAUNCHER_REPORTS_ENV, stop_with_parent

#: The values of ``training.distributed``.
STRATEGIES = ("auto", "none", "ddp", "fsdp")
#: torchrun's environment variables that this module reads.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 does all file I/O). world_size: number of ranks.
        local_rank: rank on this machine (picks the GPU). local_world_size: ranks on this machine.
        strategy: ``none`` (one process), ``ddp`` or ``fsdp``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        """True when a process group is in use."""
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0


# ----------------------------------------------------------------------------- setup
def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """Rank, world size and local rank/world size from torchrun's variables (None: not set)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    out = {}
    for key in ENV_KEYS:
        value = environ.get(key, "1" if key == "LOCAL_WORLD_SIZE" else "0")
        try:
            out[key] = int(value)
        except ValueError:
            raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None
    if not 0 <= out["RANK"] < out["WORLD_SIZE"]:
        raise ConfigError(f"RANK={out['RANK']} is outside WORLD_SIZE={out['WORLD_SIZE']}")
    return out


def resolve_strategy(requested: str, launched: bool) -> str:
    """``training.distributed`` made concrete: ``auto`` is DDP under torchrun, else ``none``."""
    if requested not in STRATEGIES:
        raise ConfigError(f"training.distributed must be one of {STRATEGIES}, got {requested!r}")
    if requested == "auto":
        return "ddp" if launched else "none"
    if requested != "none" and not launched:
        raise ConfigError(
            f"training.distributed is {requested!r} but this process was not started by "
            "torchrun: use `torchrun --nproc_per_node N -m loraq train ...` or "
            "`loraq train ... --nproc N`"
        )
    if requested == "none" and launched and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError(
            "training.distributed is 'none' but torchrun started several ranks; "
            "use 'ddp' or 'fsdp' (or 'auto')"
        )
    return requested


def setup(requested: str, device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA).

    Returns this rank's :class:`Dist` and its device (``cuda:LOCAL_RANK`` on CUDA). Without
    torchrun (and ``requested`` ``auto`` or ``none``) returns ``Dist()`` and ``device``.
    """
    env = torchrun_env()
    strategy = resolve_strategy(requested, env is not None)
    if env is not None:
        stop_with_parent()  # a launcher killed with -9 must not leave its ranks running
    if strategy == "none":
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", env["LOCAL_RANK"])
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(backend, **kwargs)
    info = Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env["LOCAL_RANK"],
        local_world_size=max(1, env["LOCAL_WORLD_SIZE"]),
        strategy=strategy,
    )
    return info, device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random generators in a run seeded with ``seed``.

    Every rank builds the model from ``seed`` itself (the same LoRA initialisation on every
    rank), then reseeds with this value before training, so that dropout draws different
    masks on each rank (as one process draws different masks for each example of its batch)
    while a rerun or a resume repeats them exactly. Distinct for every (seed, rank) pair.
    """
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def ranks_on_this_machine() -> int:
    """Ranks torchrun started on this machine (``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    env = torchrun_env()
    return max(1, env["LOCAL_WORLD_SIZE"]) if env else 1


def teardown(info: Dist) -> None:
    """Leave the process group (local; safe after a failure on another rank)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model
def wrap(model: nn.Module, info: Dist, device: torch.device) -> nn.Module:
    """The module to run training steps through: ``model`` in DDP or sharded by FSDP2.

    DDP: every rank built the same model from the same seed, so no initial broadcast of the
    (large, frozen) base is needed; the trainable parameters are broadcast from rank 0 anyway,
    as a guard. Only parameters with ``requires_grad`` are all-reduced (DDP's rule), buffers are
    not broadcast (the frozen quantized base is identical on every rank).
    FSDP2: ``model`` is sharded in place and returned (see :func:`shard_model`).
    """
    if info.strategy == "fsdp":
        return shard_model(model, info)
    if info.strategy != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    device_ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.1x renamed broadcast_buffers; init_sync=False already skips the initial sync.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )
    if "init_sync" in params:
        no_buffer_sync["init_sync"] = False
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 shards in place: itself)."""
    return getattr(model, "module", model)


def shard_model(model: nn.Module, info: Dist) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``): each transformer block, then the
    root (embeddings, head, norms); every rank keeps about 1/N of every parameter.

    The frozen quantized base: each quantized layer first exposes its record's per-element
    tensors (packed 4-bit codes, block scales; see ``QuantizedModule.expose_for_sharding``)
    as frozen parameters, so FSDP2 splits them on dim 0 like any weight and all-gathers them
    before the block's forward and again for its backward. FSDP2 gathers a group whose
    parameters have different dtypes (uint8 codes, float32 scales) as one byte buffer, so no
    float view of the codes is needed (that was bitsandbytes' ``quant_storage``, for FSDP1's
    single-dtype flat parameters), and no tensor subclass either (torchao's ``NF4Tensor``
    implements ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` and a table of aten ops so
    that each shard is itself a valid NF4 tensor, which needs shards aligned to blocks).
    Here a shard is only bytes, never computed on, so any split is valid; what travels per
    layer and step is exactly the quantized record (4.127 bits per weight for NF4 with double
    quantization), twice (forward and backward), and only adapter gradients are
    reduce-scattered.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, QuantizedModule):
            module.expose_for_sharding()
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (info.world_size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed`` DTensor (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 group of ``model`` back in its sharded state.

    FSDP2 keeps the root group (embeddings, head, a ``modules_to_save`` copy) gathered after a
    forward that has no backward (an eval), as plain tensors over its all-gather buffer; a
    checkpoint or the saved adapter must see the sharded DTensors instead, whatever ran last.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def full_trainable(model: nn.Module, info: Dist) -> Iterator[None]:
    """Within the block, every trainable parameter of an FSDP2 model is whole on every rank.

    Entering reshards every group (:func:`reshard`: an eval may have left the root gathered),
    then all-gathers the trainable shards (adapters, modules_to_save, trained biases; never the
    frozen base); on leaving, each rank copies its shard back out of the (possibly changed) whole
    tensor, so loading a checkpoint into the whole tensors on rank 0 and broadcasting works.
    Other strategies: nothing to do.
    """
    if info.strategy != "fsdp":
        yield
        return
    from torch.distributed.tensor import distribute_tensor

    reshard(model)
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and is_dtensor(param):
                whole = nn.Parameter(param.full_tensor(), requires_grad=True)
                module._parameters[name] = whole
                swapped.append((module, name, param, whole))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, sharded, whole in swapped:
                module._parameters[name] = sharded
                local = distribute_tensor(
                    whole.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None
                ).to_local()
                sharded.to_local().copy_(local)


# ----------------------------------------------------------------------------- step
def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Sum (not mean) of the per-item cross-entropies of ``batch``, as the model's own loss."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    if task == "seq-cls":
        return nn.functional.cross_entropy(logits, labels, reduction="sum")
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def rank_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    task: str,
    global_items: int,
    weight: float,
    info: Dist,
) -> tuple[torch.Tensor, float]:
    """``(loss to backward, this rank's part of the global mean loss)`` for one micro-batch.

    The first is scaled by ``world_size`` because DDP and FSDP average gradients over ranks.
    """
    part = summed_loss(model, batch, task) * (weight / max(global_items, 1))
    return part * info.world_size, part.item()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, info: Dist, enabled: bool) -> Iterator[None]:
    """Forward and backward inside the block all-reduce (DDP) or reduce-scatter (FSDP2) the
    gradients only when ``enabled``; otherwise they accumulate locally (gradient accumulation:
    the communication happens once, on the last micro-batch)."""
    if info.strategy == "ddp" and not enabled:
        with model.no_sync():
            yield
    elif info.strategy == "fsdp":
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def micro_step(
    model: nn.Module,
    micro: MicroBatch,
    *,
    task: str,
    grad_accum: int,
    info: Dist,
    device: torch.device,
    last: bool,
) -> tuple[float, int]:
    """Forward and backward of this rank's share ``micro`` of a global micro-batch through
    ``model`` (the DDP wrapper or the FSDP2 model, which synchronise gradients); gradients are
    synchronised on the ``last`` micro-batch of the step.

    Returns ``(this rank's part of the step loss, its non-padding tokens)``.
    """
    batch = {k: v.to(device) for k, v in micro.batch.items()}
    with gradient_sync(model, info, last):
        loss, part = rank_loss(model, batch, task, micro.global_items, micro.weight, info)
        (loss / grad_accum).backward()
    tokens = int(micro.weight * batch["attention_mask"].sum().item())
    return part / grad_accum, tokens


def agree(values: list[float], info: Dist) -> list[float]:
    """``values`` summed over all ranks (one small all-reduce), as floats."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, info: Dist) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce)."""
    return agree([float(flag)], info)[0] > 0 if info.enabled else flag


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model this rank holds, counting local shards only.

    ``base_quantized``: the quantized records' per-element data (codes, block scales; what
    :attr:`QuantizedTensor.nbytes` counts); ``base_constants``: their code books and offsets;
    ``trainable``; ``other`` (dense frozen weights, buffers).
    """
    record_data = {RECORD_PREFIX + name for name in SHARDABLE_FIELDS}
    out = {"base_quantized": 0, "base_constants": 0, "trainable": 0, "other": 0}
    for module in model.modules():
        quantized = isinstance(module, QuantizedModule)
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            local = t.to_local() if is_dtensor(t) else t
            size = local.numel() * local.element_size()
            if quantized and name in record_data:
                out["base_quantized"] += size
            elif quantized and name.startswith(RECORD_PREFIX):
                out["base_constants"] += size
            elif t.requires_grad:
                out["trainable"] += size
            else:
                out["other"] += size
    return out


def launch(nproc: int, train_args: list[str]) -> list[int]:
    """Run ``loraq train TRAIN_ARGS`` on ``nproc`` ranks of this machine with torchrun's own
    launcher (as ``torchrun --standalone --nproc_per_node NPROC -m loraq train ...``).

    Returns the exit codes of the ranks that failed (empty when all succeeded). A signal
    that stops the launcher (SIGINT from Ctrl-C, SIGTERM) is forwarded by torchrun to
    the ranks, which write one checkpoint and stop; then the result is ``[EXIT_INTERRUPTED]``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "-m", "loraq", "train", *train_args]
    )
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {sig: signal.getsignal(sig) for sig in handled}  # torchrun replaces them
    quiet = _QuietShutdown()
    # A filter sees only its own logger's records: give it to each of torchrun's loggers.
    loggers = [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith("torch.distributed")
    ]
    for logger in loggers:
        logger.addFilter(quiet)
    reports = os.environ.get(LAUNCHER_REPORTS_ENV)
    os.environ[LAUNCHER_REPORTS_ENV] = "1"  # the ranks inherit it
    try:
        run(args)
    except ChildFailedError as err:
        return [failure.exitcode for failure in err.failures.values()]
    except SignalException:
        return [EXIT_INTERRUPTED]
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
        if reports is None:
            os.environ.pop(LAUNCHER_REPORTS_ENV, None)
        else:
            os.environ[LAUNCHER_REPORTS_ENV] = reports
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return []


class _QuietShutdown(logging.Filter):
    """Drops torchrun's warnings about a requested stop (``loraq train`` says it in one line);
    its other records pass."""

    NOISE = ("death signal", "closing signal", "termination signal")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in record.getMessage() for part in self.NOISE)
