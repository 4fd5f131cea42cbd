"""One decode step of the serving engine: where the time goes, and what mixed adapters cost.

    python benchmarks/decode_step.py [--model smollm2|stories|smollm2-shape] [--steps 20]
                                     [--profile] [--adapters 0,1,8,64] [--batch 1,8]
                                     [--lean auto,off] [--native auto,off]

For each batch size and adapter count it fills a :class:`~loraq.generation.decode.DecodeBatch`
(the loop ``loraq serve`` runs) with prompts of 16 tokens, the rows spread round-robin over
the adapters (0: every row on the bare base), and times ``step()``: median wall and CPU ms per step over
``--steps`` steps, every configuration taking its turn within each round (a shared machine
slows them alike). ``--profile`` prints cProfile's top functions (own CPU time of the
profiling thread, as a share of the step; compiled kernels count in their Python caller; with
``--threads 1`` that is all the work) for each configuration. Ratios to compare: tokens/s of a batch over N
adapters / the same batch on one adapter. ``--native`` compares the lean step with its layers
compiled (``LORAQ_LEAN_NATIVE=auto``) and as PyTorch operations (``off``); the last column is
against the last value of ``--native`` (or, with one, of ``--lean``). The load average is
printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import base_model, with_adapters  # noqa: E402  (the serving benchmark's models)
from timing import machine_line  # noqa: E402

from loraq.generation.decode import DecodeBatch, SamplingParams, SequenceState  # noqa: E402
from loraq.generation.lean_step import LEAN_DECODE_ENV  # noqa: E402
from loraq.generation.native_step import NATIVE_ENV  # noqa: E402


def make_batch(
    model,
    rows: int,
    adapters: int,
    vocab: int,
    cache_len: int,
    lean: str = "auto",
    native: str = "auto",
) -> DecodeBatch:
    """A running batch of ``rows`` prompts of 16 tokens over ``adapters`` adapters (0: none),
    its decode steps lean or not as ``lean`` (a ``LORAQ_LEAN_DECODE`` value) says, their
    layers compiled or not as ``native`` (a ``LORAQ_LEAN_NATIVE`` value) says."""
    gen = torch.Generator().manual_seed(0)
    os.environ[LEAN_DECODE_ENV] = lean
    os.environ[NATIVE_ENV] = native
    batch = DecodeBatch(model)  # per-row adapters, as the serving engine runs it
    seqs = []
    for i in range(rows):
        prompt = torch.randint(1, vocab, (16,), generator=gen).tolist()
        name = f"a{i % adapters}" if adapters else None
        seqs.append(SequenceState(prompt, name, SamplingParams(max_new_tokens=1 << 20)))
    batch.add(seqs)
    for _ in range(cache_len):  # the cache a reply of a few dozen tokens has
        batch.step()
    return batch


def profile_step(batch: DecodeBatch, steps: int, label: str, top: int) -> None:
    """cProfile of ``steps`` steps on this thread's CPU clock (a preempted process does not
    count the wait), functions by own time as shares of the total."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for _ in range(steps):
        batch.step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    print(f"\n### {label}: {1e3 * total / steps:.1f} ms CPU per step; top functions by own time")
    print(f"{'function':<64} {'share':>7} {'calls/step':>11}")
    for (file, line, name), v in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = f"{Path(file).name}:{line} {name}" if line else name
        print(f"{where[-64:]:<64} {v[2] / total:>7.1%} {v[1] / steps:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", choices=["smollm2", "stories", "smollm2-shape"]
    )
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--adapters", default="0,1,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", type=int, default=16, help="decode steps before timing")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--lean", default="auto", help="LORAQ_LEAN_DECODE values to compare, e.g. auto,off"
    )
    parser.add_argument(
        "--native", default="auto", help="LORAQ_LEAN_NATIVE values to compare, e.g. auto,off"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, what = base_model(args.model)
    counts = [int(c) for c in args.adapters.split(",")]
    if max(counts) > 0:
        with_adapters(model, max(counts))
    model.eval()
    vocab = model.config.vocab_size
    sizes = [int(b) for b in args.batch.split(",")]
    leans, natives = args.lean.split(","), args.native.split(",")
    configs = {
        (b, a, lean, native): make_batch(model, b, a, vocab, args.cache, lean, native)
        for b in sizes
        for a in counts
        for lean in leans
        for native in natives
    }
    print(f"# decode step: {what}, threads={torch.get_num_threads()}, cache {16 + args.cache}")
    print(machine_line())
    wall = {k: [] for k in configs}
    cpu = {k: [] for k in configs}
    for _ in range(args.steps):
        for key, batch in configs.items():
            t, c = time.perf_counter(), time.process_time()
            batch.step()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    print(machine_line())
    print(f"# {args.steps} steps per configuration")
    by_native = len(natives) > 1
    versus = natives[-1] if by_native else leans[-1]
    print(
        f"\n{'batch':>5} {'adapters':>8} {'lean':>5} {'native':>6} {'wall ms':>8} {'cpu ms':>8}"
        f" {'tok/s':>8} {'vs 1 adapter':>12} {'vs ' + versus:>8}"
    )
    for key in configs:
        b, a, lean, native = key
        w, c = statistics.median(wall[key]), statistics.median(cpu[key])
        one = (b, 1, lean, native)
        other = (b, a, lean, natives[-1]) if by_native else (b, a, leans[-1], native)
        ratio = statistics.median(wall[one]) / w if one in configs else float("nan")
        versus_ratio = statistics.median(wall[other]) / w
        print(
            f"{b:>5} {a:>8} {lean:>5} {native:>6} {1e3 * w:>8.1f} {1e3 * c:>8.1f} {b / w:>8.1f}"
            f" {ratio:>12.2f} {versus_ratio:>8.2f}"
        )
    if args.profile:
        for (b, a, lean, native), batch in configs.items():
            label = f"batch {b}, {a} adapters, lean {lean}, native {native}"
            profile_step(batch, 5, label, args.top)


if __name__ == "__main__":
    main()
