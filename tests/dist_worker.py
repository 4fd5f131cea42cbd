"""A training rank for tests/test_distributed.py, started by torchrun.

    python -m torch.distributed.run ... tests/dist_worker.py CONFIG [--key value ...]
        [--fault raise|sigterm --fault-rank R --fault-step K]

Runs :func:`loraq.train.train` with the config (and overrides, as ``loraq train`` reads them);
at optimizer step K, rank R raises RuntimeError or sends itself SIGTERM. Each rank prints its
resident quantized-base bytes before and after wrapping (``rank R base bytes A -> B``) and, as
each step starts, a digest of its torch RNG state (``rank R step S rng HEX``: the stream its
dropout masks come from). Exit code 0 when the run finished or stopped on a signal (prints ``stopped at
step N``), otherwise the exception's.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--fault", choices=["raise", "sigterm"])
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=2)
    args, overrides = parser.parse_known_args()

    from loraq.train import distributed, load_config, train

    rank = int(os.environ.get("RANK", "0"))
    wrap = distributed.wrap

    def wrap_and_report(model, info, device):
        """Print this rank's resident base bytes before and after DDP / FSDP2 wrapping."""
        before = distributed.resident_bytes(model)["base_quantized"]
        wrapped = wrap(model, info, device)
        after = distributed.resident_bytes(model)["base_quantized"]
        print(f"rank {rank} base bytes {before} -> {after}", flush=True)
        return wrapped

    distributed.wrap = wrap_and_report

    from loraq.train import loop

    step_once = loop.train_step

    def report_rng_and_step(session):
        """Print this rank's torch RNG digest as the step starts (its dropout masks' stream)."""
        import hashlib

        import torch

        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        print(f"rank {rank} step {session.state.step + 1} rng {digest}", flush=True)
        return step_once(session)

    loop.train_step = report_rng_and_step

    def on_step(step: int, loss: float) -> None:
        if args.fault and rank == args.fault_rank and step == args.fault_step:
            if args.fault == "raise":
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(load_config(args.config, overrides), on_step=on_step)
    if result.interrupted:
        print(f"rank {rank} stopped at step {result.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
