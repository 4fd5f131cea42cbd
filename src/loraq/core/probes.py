"""Probes of this process: peak memory, usable CPUs, the thread count for a run.

One home for what ``loraq train``, ``loraq compare`` and ``benchmarks/`` measure about the
process they run in. Standard library only, so anything may import it.

=======================  ===============================================================
:func:`read_proc_status`  a ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``)
:func:`reset_peak_rss`    restart the kernel's high-water mark (``VmHWM``) at the current RSS
:func:`peak_rss_bytes`    peak resident memory from ``getrusage`` (inherited across ``exec``)
:func:`available_cpus`    CPUs this process may run on (affinity, cgroups)
:func:`auto_threads`      threads for ``training.num_threads: null`` (less the busy CPUs)
=======================  ===============================================================
"""

from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path


def read_proc_status(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def reset_peak_rss() -> bool:
    """Restart this process's ``VmHWM`` at its current RSS (Linux >= 4.0: ``clear_refs`` 5).

    Memory that was freed but that the C allocator still holds (such as the float weights a
    quantized base replaced) is handed back first (glibc ``malloc_trim``), since the new mark
    starts at the current RSS, which would otherwise still count it. Returns False where the
    mark cannot be reset.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mark may start a little high
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``resource.getrusage``).

    A child inherits its parent's ``ru_maxrss`` across ``fork`` + ``exec``; prefer
    ``read_proc_status("VmHWM")`` where it exists.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def available_cpus() -> int:
    """CPUs this process may run on (respects ``taskset``/cgroups affinity where available)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def auto_threads() -> int:
    """Threads for ``training.num_threads: null``: the CPUs this process may use, less those
    that other work keeps busy (1-minute load average), at least 1.

    Oversubscribed CPU threads spin at every parallel region and can make a step several times
    slower than one thread would; on an idle machine this is simply :func:`available_cpus`. The
    answer changes with the machine's load, so a run records the count it used in its
    checkpoints and a resumed run reuses it (a different count changes the float summation
    order, and a resumed run would no longer equal an uninterrupted one).
    """
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    busy = load * cpus / (os.cpu_count() or cpus)
    return max(1, min(cpus, int(cpus - busy + 0.5)))
