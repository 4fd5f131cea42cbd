"""Adapters known to the server, by name: where they live, which are in memory, who uses them.

- Known adapters come from ``--adapter NAME=PATH`` (trusted: the operator typed them), from the
  sub-folders of ``--adapter-dir`` that hold an ``adapter_config.json``, and from run-time
  ``POST /v1/adapters`` requests, whose paths must stay under ``--adapter-dir``.
- At most ``max_resident`` adapters are resident at once, as slots of the registry's
  :class:`~loraq.batching.pool.AdapterPool` (no modules are added to the model: a load writes
  a few tensors per adapted layer, an eviction zeroes them); loading another evicts the least
  recently used one that no running request holds (it is reloaded on next use).
- Each load and each LRU eviction is counted in ``metrics`` (``GET /metrics``), so an operator
  sees whether ``--max-adapters`` is too small for the traffic (a load on most requests).
- A load is two parts. Reading and parsing the folder (disk, safetensors, config checks) runs on
  a worker thread with no lock held, started by :meth:`AdapterRegistry.prefetch` as soon as a
  request is accepted; concurrent requests for one adapter share one read. Parsed copies stay
  on the host (:mod:`loraq.serve.adapter_reads`; a file rewritten on disk is read again), so
  an evicted adapter comes back without the disk. Only the write
  into the pool (:meth:`~loraq.batching.pool.AdapterPool.load`) holds ``model_lock``.
- Every model mutation happens under ``model_lock``, which the engine also holds for each step.
- Two counts per adapter: ``pending`` (requests accepted and not yet finished, queued or running)
  and ``in_use`` (rows in the running batch). ``DELETE`` stops new reservations, waits for
  ``pending`` to reach 0 and removes the adapter under ``model_lock`` only if both counts are
  still 0, so no row ever runs on an adapter that is gone (which would fail the whole batch).
- A request's ``model`` may be a combination of known adapters (``"a*0.7+b*0.3"``, parsed by
  :func:`~loraq.serve.fields.combination`). The first request computes it with
  ``loraq.combine(..., method="cat")`` (exact: its delta is the weighted sum of the sources'
  deltas, whatever their ranks) in the model's own layers, loading the sources there only for
  that moment, copies it into the pool and caches it as an adapter under an internal name (:data:`COMBINATION_PREFIX`): resident and
  evicted like any other (recomputed on next use), not listed in ``GET /v1/models``, and
  forgotten when one of its sources is deleted.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torch import nn

from ..batching.pool import AdapterPool, PoolError, StagedFactors, stage_factors
from ..batching.rows import validate_row_names
from ..io.peft_factors import ParameterAdapterError, layer_factors
from ..io.peft_format import is_adapter_folder, load_adapter
from ..model.combine import combine
from ..model.surgery import adapter_names, delete_adapter
from .adapter_reads import AdapterReadError, AdapterReads, ParsedAdapter, load_failure
from .metrics import ServerMetrics

#: Allowed adapter names: they become model ids in the API and module keys in the model.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
#: How a ``model`` combination is computed: ``cat`` is exact for any ranks (the others approximate).
COMBINATION_METHOD = "cat"
#: Start of a cached combination's adapter name; ``~`` is outside :data:`NAME_PATTERN`, so no
#: client-chosen adapter name can collide with one.
COMBINATION_PREFIX = "combination~"


class ServeError(Exception):
    """An error answered to the client: HTTP status, message, offending field and headers."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def check_name(name: object, field: str = "name") -> str:
    """``name`` if it is a valid adapter name, else a 400 naming ``field``."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ServeError(
            400,
            f"{field} must be 1-64 characters of letters, digits, '_' or '-', got {name!r}",
            field,
        )
    return name


def resolve_under(root: Path, relative: object, field: str = "path") -> Path:
    """The adapter folder ``root/relative``, refused unless it (and every file in it) stays in ``root``.

    Absolute paths, ``..`` components and symlinks that lead outside ``root`` are refused; the
    folder must hold safetensors weights and no pickle files.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ServeError(
            400, f"{field} must be a non-empty string relative to --adapter-dir", field
        )
    try:
        return _confined_folder(root, relative, field)
    except (OSError, ValueError) as err:  # NUL, unpaired surrogate, name too long, ...
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ServeError(
            400, f"{field} {short_repr(relative)} is not a usable path: {reason[:80]}", field
        ) from None


def _confined_folder(root: Path, relative: str, field: str) -> Path:
    """:func:`resolve_under`'s checks on a string; the file system may raise on odd names."""
    rel = PurePosixPath(relative.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or relative.startswith("~"):
        raise ServeError(
            400,
            f"{field} {short_repr(relative)} must be relative to --adapter-dir, without '..'",
            field,
        )
    base = root.resolve()
    folder = (base / rel).resolve()
    if not folder.is_relative_to(base):
        raise ServeError(400, f"{field} {short_repr(relative)} leads outside --adapter-dir", field)
    if not folder.is_dir():
        raise ServeError(
            404,
            f"{field} {short_repr(relative)}: no such adapter folder under --adapter-dir",
            field,
        )
    for entry in folder.rglob("*"):
        if not entry.resolve().is_relative_to(base):
            raise ServeError(
                400,
                f"{field} {short_repr(relative)}: {entry.name} links outside --adapter-dir",
                field,
            )
        if entry.suffix in _PICKLE_SUFFIXES:
            raise ServeError(
                400,
                f"{field} {short_repr(relative)}: {entry.name} is a pickle file; only safetensors is loaded",
                field,
            )
    if not any(folder.rglob("*.safetensors")):
        raise ServeError(
            400, f"{field} {short_repr(relative)} holds no .safetensors adapter weights", field
        )
    return folder


@dataclass
class AdapterEntry:
    """One known adapter: its folder, its requests (accepted / running) and whether it leaves."""

    path: Path | None  # None: applied in code, cannot be reloaded, never evicted
    in_use: int = 0  # rows in the running batch: the LRU must not evict it
    pending: int = 0  # requests accepted and not finished: DELETE waits for them
    unloading: bool = False  # DELETE under way: no new requests
    sources: tuple[tuple[str, float], ...] = ()  # a combination: (adapter, weight) pairs


class AdapterRegistry:
    """Known adapters, the LRU of resident ones, and per-adapter use counts (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        base_name: str = "base",
        adapter_dir: Path | None = None,
        max_resident: int = 64,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"--max-adapters must be >= 1, got {max_resident}")
        self.model = model
        self.base_name = base_name
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir).resolve()
        self.max_resident = max_resident
        self.metrics = ServerMetrics() if metrics is None else metrics
        self.model_lock = threading.RLock()
        self._entries: dict[str, AdapterEntry] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._combinations: dict[tuple[tuple[str, float], ...], str] = {}  # sources -> name
        self._combination_count = 0
        self._reads = AdapterReads(prepare=_staged)
        #: the resident adapters, as slots the engine's mixed batches read (no modules)
        self.pool = AdapterPool(model, max_resident)

    # ------------------------------------------------------------------ known adapters
    def add(self, name: str, path: Path) -> None:
        """Register adapter ``name`` at ``path`` (loaded on first use)."""
        check_name(name)
        if name == self.base_name:
            raise ServeError(409, f"adapter name {name!r} is the base model's name", "name")
        with self._lock:
            if name in self._entries:
                raise ServeError(409, f"an adapter named {name!r} already exists", "name")
            self._entries[name] = AdapterEntry(Path(path))

    def add_resident(self, name: str) -> None:
        """Register adapter ``name`` that is already in the model (library use: no folder, so
        it is never evicted)."""
        validate_row_names(self.model, [name])  # the engine runs mixed-adapter batches
        with self.model_lock:
            self.pool.load_from_model(name)
        with self._lock:
            self._entries[name] = AdapterEntry(path=None)
            self._resident[name] = None

    def add_from_dir(self) -> tuple[list[str], list[str]]:
        """Register every sub-folder of ``adapter_dir`` holding an ``adapter_config.json``.

        Returns the names added and, for folders refused by the path rules (see
        :func:`resolve_under`), one message each; a bad folder does not stop the others.
        """
        if self.adapter_dir is None:
            return [], []
        added, skipped = [], []
        for folder in sorted(self.adapter_dir.iterdir()):
            if not is_adapter_folder(folder):
                continue
            try:
                check_name(folder.name, "adapter folder name")
                self.add(folder.name, resolve_under(self.adapter_dir, folder.name))
            except ServeError as err:
                skipped.append(err.message)
                continue
            added.append(folder.name)
        return added, skipped

    def add_runtime(self, name: object, relative: object) -> str:
        """``POST /v1/adapters``: register and load ``name`` from ``adapter_dir/relative``."""
        name = check_name(name)
        if self.adapter_dir is None:
            raise ServeError(
                403, "run-time adapter loading needs the server started with --adapter-dir"
            )
        folder = resolve_under(self.adapter_dir, relative)
        self.add(name, folder)
        try:
            self.acquire(name)
            self.release(name)
        except Exception:
            with self._lock:
                self._entries.pop(name, None)
            raise
        return name

    def add_combination(self, sources: tuple[tuple[str, float], ...]) -> str:
        """The adapter name of the combination ``sources`` (``(adapter, weight)`` pairs sorted
        by name), computed and cached on first use (see the module doc). A 400 naming
        ``model`` for a source that is not a known adapter, or sources combine refuses."""
        for source, _ in sources:
            entry = self._entries.get(source)
            if entry is None or entry.unloading or entry.sources:
                raise ServeError(
                    400,
                    f"model: {short_repr(source)} in the combination is not an adapter of this "
                    "server; see GET /v1/models",
                    "model",
                )
        with self._lock:
            name = self._combinations.get(sources)
            if name is not None and self.is_known(name):
                return name
            self._combination_count += 1
            name = f"{COMBINATION_PREFIX}{self._combination_count}"
            self._entries[name] = AdapterEntry(path=None, sources=sources)
            self._combinations[sources] = name
        try:  # computed now, so that a combination combine refuses is this request's 400
            if self.acquire(name):
                self.release(name)
        except Exception:
            with self._lock:
                self._entries.pop(name, None)
                self._combinations.pop(sources, None)
            raise
        return name

    def names(self) -> list[str]:
        """Known adapter names (resident or not), in registration order; cached combinations
        are not listed."""
        with self._lock:
            return [n for n, e in self._entries.items() if not e.unloading and not e.sources]

    def is_known(self, name: str) -> bool:
        """True if ``name`` is a known adapter not being unloaded."""
        entry = self._entries.get(name)
        return entry is not None and not entry.unloading

    def resident(self) -> list[str]:
        """Names of adapters loaded in the model, least recently used first."""
        return list(self._resident)

    # ------------------------------------------------------------------ use counts and LRU
    def reserve(self, name: str | None) -> None:
        """Count one accepted request for ``name`` (a 404 if unknown or being unloaded); every
        reservation is given back once with :meth:`unreserve` when the request ends."""
        if name is None:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise ServeError(404, f"model {short_repr(name)} does not exist", "model")
            entry.pending += 1

    def unreserve(self, name: str | None) -> None:
        """Give back one reservation taken by :meth:`reserve`."""
        if name is None:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.pending -= 1

    def pending(self, name: str) -> int:
        """Accepted requests for ``name`` not yet finished (queued or running)."""
        entry = self._entries.get(name)
        return 0 if entry is None else entry.pending

    def acquire(self, name: str | None) -> bool:
        """Hold adapter ``name`` for one running row, loading it if needed.

        Returns False (and holds nothing) when every resident slot is held by running requests,
        so the caller should retry later. Raises :class:`ServeError` for unknown adapters and
        for adapters whose files fail to load. The check, the load and the count happen under
        ``model_lock``, so :meth:`finish_unload` sees either the hold or no adapter.
        """
        if name is None:
            return True
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise ServeError(404, f"model {short_repr(name)} does not exist", "model")
        parsed = None
        if name not in self._resident and entry.path is not None:
            parsed = self._parsed(name, entry)  # disk and parsing: no lock held
        with self.model_lock:
            if name not in self._resident:
                if not self._make_room():
                    return False
                self._load(name, entry, parsed)
            self._resident.move_to_end(name)
            with self._lock:
                entry.in_use += 1
        return True

    def release(self, name: str | None) -> None:
        """Give back one hold taken by :meth:`acquire`."""
        if name is None:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.in_use -= 1

    def in_use(self, name: str) -> int:
        """Running rows holding ``name``."""
        entry = self._entries.get(name)
        return 0 if entry is None else entry.in_use

    # ------------------------------------------------------------------ reading off the lock
    def is_ready(self, name: str | None) -> bool:
        """True when :meth:`acquire` needs no disk for ``name``: no adapter, a resident one, a
        parsed copy on the host, a finished read (its error is acquire's to raise), or none
        possible (unknown, or no folder)."""
        if name is None or name in self._resident:
            return True
        entry = self._entries.get(name)
        if entry is None or entry.path is None:
            return True
        return self._reads.ready(name)

    def prefetch(self, name: str | None) -> None:
        """Start reading ``name``'s folder on a worker thread unless it is resident, on the
        host or being read already (returns at once; errors surface in :meth:`acquire`)."""
        if self.is_ready(name):
            return
        entry = self._entries.get(name)
        if entry is not None and entry.path is not None:
            self._reads.start(name, entry.path)

    def wait_for_reads(self, names: list[str], timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the first read of ``names`` under way to end."""
        self._reads.wait(names, timeout)

    def close(self) -> None:
        """Stop the reader threads (reads under way finish)."""
        self._reads.close()

    def _parsed(self, name: str, entry: AdapterEntry) -> StagedFactors:
        """``name``'s folder, read, parsed and staged for the pool (:meth:`AdapterReads.parsed`,
        the host copy where there is one); a failed read is a 500."""
        try:
            return self._reads.parsed(name, entry.path)
        except AdapterReadError as err:
            raise ServeError(500, str(err)) from None

    def _make_room(self) -> bool:
        while len(self._resident) >= self.max_resident:
            idle = [
                n
                for n in self._resident
                if self._entries[n].in_use == 0
                and (self._entries[n].path is not None or self._entries[n].sources)
            ]
            if not idle:
                return False
            self._unload_from_model(idle[0])
            self.metrics.adapter_evictions.inc()
        return True

    def _load(self, name: str, entry: AdapterEntry, parsed: StagedFactors | None) -> None:
        if entry.sources:
            self._combine(name, entry.sources)
            self._resident[name] = None
            return
        if parsed is None:  # added to the model's resident set meanwhile? read it now
            parsed = self._parsed(name, entry)
        try:
            self.pool.load(name, parsed)
        except (PoolError, ValueError) as err:
            raise ServeError(500, load_failure(name, entry.path, err)) from None
        self._resident[name] = None
        self.metrics.adapter_loads.inc()

    def _combine(self, name: str, sources: tuple[tuple[str, float], ...]) -> None:
        """Add combination ``name`` to the pool: its sources go into the model's own layers for
        the moment only (under ``model_lock``, so no step sees them), ``loraq.combine`` makes
        it there, and the pool copies it."""
        borrowed: list[str] = []
        try:
            for source, _ in sources:
                with self._lock:
                    entry = self._entries.get(source)
                if entry is None or entry.unloading:
                    raise ServeError(
                        400, f"model: adapter {short_repr(source)} no longer exists", "model"
                    )
                if source not in adapter_names(self.model):
                    load_adapter(self.model, entry.path, adapter_name=source)
                    borrowed.append(source)
            combine(self.model, dict(sources), method=COMBINATION_METHOD, name=name)
            borrowed.append(name)
            self.pool.load_from_model(name)
        except ServeError:
            raise
        except Exception as err:
            message = str(err).removeprefix("combine: ")
            raise ServeError(
                400, f"model: the combination cannot be made: {message}", "model"
            ) from None
        finally:
            for source in borrowed:
                delete_adapter(self.model, source)

    def _unload_from_model(self, name: str) -> None:
        if name in self.pool:
            self.pool.evict(name)
        if name in adapter_names(self.model):  # an adapter applied in code (add_resident)
            delete_adapter(self.model, name)
        self._resident.pop(name, None)

    def begin_unload(self, name: str) -> AdapterEntry:
        """Mark ``name`` as leaving: new requests for it get 404 from now on."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise ServeError(404, f"adapter {short_repr(name)} does not exist", "name")
            entry.unloading = True
            return entry

    def cancel_unload(self, name: str) -> None:
        """Undo :meth:`begin_unload` (the unload was refused)."""
        with self._lock:
            if name in self._entries:
                self._entries[name].unloading = False

    def finish_unload(self, name: str) -> bool:
        """Forget ``name`` and free its memory if no request holds or awaits it; returns False
        (and changes nothing) while one still does."""
        with self.model_lock:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None and (entry.pending > 0 or entry.in_use > 0):
                    return False
                self._entries.pop(name, None)
            self._unload_from_model(name)
            self._forget_combinations_of(name)
        self._reads.forget(name)
        return True

    def _forget_combinations_of(self, source: str) -> None:
        """Cached combinations built from ``source`` (just deleted) take no new requests; idle
        ones leave the model now, busy ones when the LRU evicts them."""
        with self._lock:
            stale = [(key, name) for key, name in self._combinations.items() if source in dict(key)]
            for key, name in stale:
                del self._combinations[key]
                self._entries[name].unloading = True
        for _, name in stale:
            entry = self._entries[name]
            if entry.pending == 0 and entry.in_use == 0:
                with self._lock:
                    self._entries.pop(name, None)
                self._unload_from_model(name)


def _staged(name: str, parsed: ParsedAdapter) -> StagedFactors:
    """Adapter ``name``'s parsed folder as the pool loads it, made once per read (the host
    keeps it): its factors grouped by module (:func:`layer_factors`) and staged."""
    config, tensors, weights = parsed
    try:
        return stage_factors(layer_factors(config, tensors, weights.name))
    except ParameterAdapterError as err:
        # the engine runs mixed-adapter batches, which adapters on parameters cannot join
        raise ServeError(400, f"adapter {name!r}: {err}") from None
    except ValueError as err:
        raise ServeError(500, load_failure(name, weights.parent, err)) from None


def short_repr(name: str, limit: int = 80) -> str:
    """``name`` quoted for an error message, cut short (a client chooses its length)."""
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + "...'"
