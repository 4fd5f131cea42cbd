"""loraq.core.threads.on_passing_thread: result and errors come back, and the OpenMP workers
a parallel torch op starts on it end with it (the reason it exists: see the module doc)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from loraq.core.threads import on_passing_thread


def test_returns_the_result_and_raises_the_error_on_the_caller():
    caller = threading.get_ident()
    assert on_passing_thread(lambda a, b=0: (a + b, threading.get_ident()), 2, b=3)[0] == 5
    assert on_passing_thread(threading.get_ident) != caller

    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        on_passing_thread(fail)


def _thread_ids() -> set[int]:
    return {int(task.name) for task in Path("/proc/self/task").iterdir()}


def _all_gone(ids: set[int], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while ids & _thread_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not ids & _thread_ids()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
@pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info(), reason="needs PyTorch's OpenMP"
)
def test_openmp_workers_started_on_it_end_with_it():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever an earlier test (or loraq train's load rule) set
    try:
        _check_workers_end_with_their_thread()
    finally:
        torch.set_num_threads(threads)


def _check_workers_end_with_their_thread() -> None:
    def parallel_op() -> None:
        x = torch.randn(1 << 20)
        for _ in range(3):
            x = x * 1.0001 + 1.0  # well over the parallel grain: runs on an OpenMP team

    # Threads are told apart by id, not counted: a thread an earlier test left behind may end
    # (or a pool elsewhere start) meanwhile, and a count would then never settle.
    before = _thread_ids()

    def op_and_its_threads() -> set[int]:
        parallel_op()
        return _thread_ids() - before  # this thread and the workers its parallel op started

    started_here = on_passing_thread(op_and_its_threads)
    assert len(started_here) > 1  # the passing thread and at least one worker
    # the workers leave as their master's thread ends, a moment after join() returns
    assert _all_gone(started_here)

    # the contrast that makes the test able to fail: a thread that stays keeps its workers
    started, stop = threading.Event(), threading.Event()
    kept: set[int] = set()

    def staying() -> None:
        parallel_op()
        kept.update(_thread_ids() - before)
        started.set()
        stop.wait(10)

    keeper = threading.Thread(target=staying, daemon=True)
    keeper.start()
    started.wait(10)
    try:
        assert len(kept) > 1 and not _all_gone(kept, seconds=0.5)
    finally:
        stop.set()
        keeper.join()
