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
