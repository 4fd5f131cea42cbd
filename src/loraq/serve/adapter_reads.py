"""Adapter folders read off the model lock, with parsed copies kept on the host.

Reading an adapter's files touches no model, so the registry starts it on a worker thread as
soon as a request is accepted; the thread reads bytes only, and the one that wants the adapter
parses them (safetensors, finiteness) when it does, which holds no lock either. Each read has
a thread of its own that ends with it; at most :data:`READ_WORKERS` read at once.
Concurrent requests for one adapter share one read. Parsed copies stay on the host, least
recently used dropped beyond :data:`HOST_CACHE_BYTES`, so an evicted adapter comes back without
the disk; a folder whose files changed (size or mtime) is read again. The owner may turn each
parsed folder into what it loads from (``prepare``, run once per read): the host keeps that.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io.peft_format import AdapterBytes, parse_adapter_bytes, read_adapter_bytes
from ..model.config import LoraConfig

#: Most bytes of parsed adapter tensors kept on the host for reloads after an eviction.
HOST_CACHE_BYTES = 512 << 20
#: Worker threads reading and parsing adapter folders (disk and parsing, not the model).
READ_WORKERS = 2

#: What :func:`~loraq.io.peft_format.read_adapter` returns: ``(config, tensors, weights file)``.
ParsedAdapter = tuple[LoraConfig, dict[str, torch.Tensor], Path]


def load_failure(name: str, folder: Path, err: object) -> str:
    """The message for adapter ``name`` whose ``folder`` failed to read, parse or load."""
    return f"adapter {name!r} failed to load from {folder.name}: {err}"


class AdapterReadError(Exception):
    """An adapter folder that could not be read or parsed (the message names it)."""


class AdapterReads:
    """Reads of adapter folders on worker threads, and the host cache of their results.

    ``prepare(name, parsed)`` (default: none) turns a parsed folder into what :meth:`parsed`
    returns and the host keeps; its exceptions reach the caller of :meth:`parsed` as they are,
    and nothing is kept then."""

    def __init__(self, prepare: Callable[[str, ParsedAdapter], Any] | None = None) -> None:
        self._prepare = prepare
        self._lock = threading.Lock()
        # name -> (file stamp, prepared read, its tensors' bytes) of parsed folders, and the
        # reads under way
        self._host: OrderedDict[str, tuple[tuple, Any, int]] = OrderedDict()
        self._host_bytes = 0
        self._reads: dict[str, cf.Future] = {}
        self._slots = threading.BoundedSemaphore(READ_WORKERS)
        self._closed = False

    def ready(self, name: str) -> bool:
        """True when :meth:`parsed` needs no disk read for ``name``: a copy on the host or a
        finished read (whose error :meth:`parsed` raises)."""
        with self._lock:
            if name in self._host:
                return True
            future = self._reads.get(name)
        return future is not None and future.done()

    def start(self, name: str, path: Path) -> cf.Future:
        """The read of ``name`` under way, or a new one: one read per adapter at a time."""
        with self._lock:
            future = self._reads.get(name)
            if future is None or future.done():  # a finished read may be stale: read again
                future = cf.Future()
                self._reads[name] = future
                threading.Thread(
                    target=self._run_read, args=(future, name, path),
                    name="loraq-adapter-read", daemon=True,
                ).start()  # fmt: skip
            return future

    def parsed(self, name: str, path: Path) -> Any:
        """``name``'s parsed (and prepared) folder: the host copy if its files are unchanged,
        else the read under way or a new one, waited for and parsed here (a failed read is
        forgotten, so the next call retries). Raises :class:`AdapterReadError`, or what
        ``prepare`` raised."""
        with self._lock:
            held = self._host.get(name)
        if held is not None:
            if held[0] == _stamp(path):
                with self._lock:
                    if name in self._host:
                        self._host.move_to_end(name)
                return held[1]
            self.forget(name)
        with self._lock:
            future = self._reads.get(name)  # a prefetch's, finished or not
        if future is None:
            future = self.start(name, path)
        try:
            stamp, read = future.result()
        finally:
            with self._lock:
                if self._reads.get(name) is future:
                    del self._reads[name]
        if stamp != _stamp(path):  # the files changed since that read: read them again
            return self.parsed(name, path)
        try:
            parsed = parse_adapter_bytes(read)
        except Exception as err:
            raise AdapterReadError(load_failure(name, path, err)) from None
        size = _size(parsed)
        if self._prepare is not None:
            parsed = self._prepare(name, parsed)
        self._keep(name, stamp, parsed, size)
        return parsed

    def wait(self, names: list[str], timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the first read of ``names`` under way to end."""
        with self._lock:
            futures = [self._reads[n] for n in names if n in self._reads]
        if futures:
            cf.wait(futures, timeout, return_when=cf.FIRST_COMPLETED)

    def forget(self, name: str) -> None:
        """Drop ``name``'s host copy (its adapter was deleted, or its files changed)."""
        with self._lock:
            old = self._host.pop(name, None)
            if old is not None:
                self._host_bytes -= old[2]

    def close(self) -> None:
        """Start no more reads: those waiting for a slot are cancelled; those under way finish."""
        with self._lock:
            self._closed = True

    def _run_read(self, future: cf.Future, name: str, path: Path) -> None:
        """A reader thread: wait for a slot, read, hand the outcome to ``future``."""
        with self._slots:
            with self._lock:
                closed = self._closed
            if closed:
                future.cancel()
                return
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._read(name, path))
            except BaseException as err:
                future.set_exception(err)

    def _read(self, name: str, path: Path) -> tuple[tuple, AdapterBytes]:
        """Read ``name``'s folder (worker thread): its files' stamp and bytes. Only the disk:
        parsing is Python and torch work, which beside a busy engine thread would take the
        interpreter lock and cores from it; the caller of :meth:`parsed` does it."""
        try:
            return _stamp(path), read_adapter_bytes(path, adapter_name=name)
        except Exception as err:
            raise AdapterReadError(load_failure(name, path, err)) from None

    def _keep(self, name: str, stamp: tuple, prepared: Any, size: int) -> None:
        if size > HOST_CACHE_BYTES:
            return
        with self._lock:
            old = self._host.pop(name, None)
            if old is not None:
                self._host_bytes -= old[2]
            self._host[name] = (stamp, prepared, size)
            self._host_bytes += size
            while self._host_bytes > HOST_CACHE_BYTES:
                _, (_, _, dropped) = self._host.popitem(last=False)
                self._host_bytes -= dropped


def _size(parsed: ParsedAdapter) -> int:
    return sum(t.numel() * t.element_size() for t in parsed[1].values())


def _stamp(folder: Path) -> tuple:
    """What changes when an adapter folder's files are rewritten: each file's size and mtime."""
    try:
        return tuple(
            (f.name, st.st_size, st.st_mtime_ns)
            for f in sorted(folder.iterdir())
            if f.is_file() and (st := f.stat())
        )
    except OSError:
        return ()
