"""How a run is asked to stop: signal handlers that request a checkpoint and a clean stop.

:class:`GracefulInterrupt` serves a single process (the first Ctrl-C stops after the step, the
second aborts); :class:`StopSignals` serves the ranks of a distributed run (SIGINT and SIGTERM,
repeated signals expected, the ranks agree on the stop through the step's all-reduce);
:func:`stop_with_parent` makes a rank whose launcher died (``kill -9``) stop as if it had
received SIGTERM, instead of training on as an orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
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


#: Set to "1" by ``loraq train --nproc`` for its ranks: the launcher reports a stop itself.
LAUNCHER_REPORTS_ENV = "LORAQ_LAUNCHER_REPORTS"


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
        """Record the request; the rank that received it says so once (on stderr), unless
        ``loraq train --nproc`` launched it (then the launcher reports the stop in one line)."""
        if not self.requested and os.environ.get(LAUNCHER_REPORTS_ENV) != "1":
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


#: ``prctl`` option of Linux: the signal the kernel sends this process when its parent exits.
PR_SET_PDEATHSIG = 1
#: Seconds between two looks at the parent pid where the kernel cannot signal its death.
PARENT_POLL_S = 1.0


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have ``sig`` sent to this process when its parent (the torchrun launcher) dies.

    Linux: the kernel does it (``prctl(PR_SET_PDEATHSIG)``); a parent that died before the
    call is caught by comparing the parent pid before and after. Elsewhere a daemon thread
    looks at the parent pid every :data:`PARENT_POLL_S` seconds. A rank that gets SIGTERM this
    way stops like any signalled rank (:class:`StopSignals`: one checkpoint, then exit).
    """
    parent = os.getppid()
    if sys.platform.startswith("linux") and _prctl_death_signal(sig):
        if os.getppid() != parent:  # the parent died before the kernel was asked
            os.kill(os.getpid(), sig)
        return
    watcher = threading.Thread(
        target=_watch_parent, args=(parent, sig), name="loraq-parent-watch", daemon=True
    )
    watcher.start()


def _prctl_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False when it is unavailable or fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), sig)
