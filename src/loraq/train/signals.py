"""How a run is asked to stop: signal handlers that request a checkpoint and a clean stop.

:class:`GracefulInterrupt` serves a single process (the first Ctrl-C stops after the step, the
second aborts); :class:`StopSignals` serves the ranks of a distributed run (SIGINT and SIGTERM,
repeated signals expected, the ranks agree on the stop through the step's all-reduce).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from tqdm.auto import tqdm


class GracefulInterrupt:
    """Context manager: the first Ctrl-C (SIGINT) asks the loop to checkpoint and stop after the
    current step; a second one aborts at once with ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def handler(self, signum: int, frame: Any) -> None:
        """The SIGINT handler."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press again to abort)")

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class StopSignals:
    """Context manager: SIGINT and SIGTERM ask for a checkpoint and a clean stop.

    Unlike a single process's handler, repeated signals do not abort at once: under torchrun a
    Ctrl-C reaches every rank and the launcher, and the launcher forwards it again, so the
    second signal is expected. (torchrun kills ranks that have not exited 30 s later.)
    """

    def __init__(self, rank: int) -> None:
        self.requested = False
        self.rank = rank
        self._previous: dict[int, Any] = {}

    def handler(self, signum: int, frame: Any) -> None:
        """Record the request; the rank that received it says so once (on stderr)."""
        if not self.requested:
            name = signal.Signals(signum).name
            print(
                f"rank {self.rank}: {name}: saving a checkpoint after this step and stopping",
                file=sys.stderr,
                flush=True,
            )
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
