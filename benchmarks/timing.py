"""Side-by-side timing shared by the benchmarks: every contender once per round, shuffled."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round in a shuffled order (after
    one warm-up), so that neither background load nor what ran just before favours anyone."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


# The CPU features that decide which kernels run (and what ``compute_dtype: auto`` picks),
# most capable first: a figure measured on one kind need not hold on another.
_CPU_KINDS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx2", "AVX2-only"))


def cpu_kind(flags: set[str]) -> str:
    """The README's name for a CPU with these ``/proc/cpuinfo`` flags: ``AMX``, ``AVX512-BF16``,
    ``AVX2-only`` or ``no AVX2``."""
    for flag, name in _CPU_KINDS:
        if flag in flags:
            return name
    return "no AVX2"


def machine_line() -> str:
    """One line naming the machine a figure was measured on: CPU model and kind, the cores this
    process may use (of the machine's), torch's thread count and version, the load average.

    Every benchmark prints it at its start and end, so a figure is quoted with its machine."""
    import os
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"# machine: {model} ({cpu_kind(flags)}), {usable} of {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average {load}"
    )
