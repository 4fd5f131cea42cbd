"""Torch work on threads that end, so one long-lived thread owns the OpenMP workers.

GNU OpenMP (the runtime PyTorch's Linux wheels and loraq's kernels use) keeps a pool of worker
threads per thread that has run a parallel region. While more of its threads exist than the
machine has cores, it stops spinning between regions and puts workers to sleep after each one;
a decode step runs hundreds of short regions, and each then pays a sleep and a wake-up. A
server whose model is loaded on the main thread and run on an engine thread has two pools, and
on a 2-core machine its decode steps took about 1.5x as long with tens of thousands more
context switches. A pool ends with its thread, so torch work done once, or now and then, off
the engine thread (loading the model, reading adapters, combining them) runs through
:func:`on_passing_thread` and leaves no pool behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["on_passing_thread"]

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args, name: str = "loraq-passing", **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on a new thread that ends when it returns; its result is
    returned and its exception raised here. The thread is a daemon: an interrupt of the caller
    does not wait for it."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as err:  # handed to the caller, which raises it
            outcome.append((False, err))

    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
