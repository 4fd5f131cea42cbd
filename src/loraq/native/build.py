"""Build a C kernel on first use and load it with :mod:`ctypes`.

Installing loraq needs no compiler. On first use a kernel source is compiled with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) for this CPU (``-march=native`` where the
compiler accepts it) into ``$LORAQ_CACHE_DIR`` (default ``~/.cache/loraq/kernels``), keyed by the
source, the flags, the compiler and the CPU, and written atomically with its SHA-256 next to it:
a cached library that no longer matches it (truncated, overwritten) is built again. Without a compiler, or if the build fails,
loraq warns once per kernel and the caller keeps its pure-PyTorch path.

``LORAQ_KERNELS`` selects (spelled as every switch, :mod:`loraq.core.switches`; any other
value is an error naming the variable):

========  =================================================
value     meaning
========  =================================================
``auto``  compiled if it builds, else pure PyTorch (default)
``off``   always pure PyTorch; nothing is compiled
``on``    compiled, or a :class:`KernelUnavailableError`
========  =================================================
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from ..core.errors import UserError
from ..core.switches import SWITCH_VALUES, read_switch

__all__ = [
    "MODE_ENV",
    "MODE_VALUES",
    "KernelUnavailableError",
    "build",
    "load_library",
    "mode",
    "shares_torch_openmp",
]

#: Environment variable choosing ``auto`` / ``off`` / ``on`` (see the module docstring).
MODE_ENV = "LORAQ_KERNELS"
# No contraction into FMA: the kernels' products and sums round separately, as the references.
_FLAGS = ("-O3", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
# GNU, Intel and LLVM OpenMP runtimes, by file name
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([.-]|$)")
#: Every accepted spelling of :data:`MODE_ENV`, by the mode it selects.
MODE_VALUES = SWITCH_VALUES


class KernelUnavailableError(UserError, RuntimeError):
    """``LORAQ_KERNELS=on`` but a kernel cannot be built or loaded (reported in one line)."""


def mode() -> str:
    """The selected mode: ``auto``, ``off`` or ``on`` (from :data:`MODE_ENV`).

    Raises:
        ValueError: for a value outside :data:`MODE_VALUES`, naming the variable.
    """
    return read_switch(MODE_ENV)


def shares_torch_openmp() -> bool:
    """Whether a kernel built with ``-fopenmp`` would run on PyTorch's own OpenMP thread pool.

    True when this process has exactly one GNU OpenMP runtime mapped and it is ``libgomp.so.1``
    (PyTorch's Linux wheels ship theirs under that name): the kernel's ``libgomp.so.1`` then
    resolves to the copy already loaded. Anywhere else (Intel or LLVM OpenMP, a renamed libgomp,
    no /proc) kernels are built without OpenMP, so a second runtime never starts.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    paths = {line.split()[-1] for line in maps.splitlines()}
    runtimes = [Path(p) for p in paths if _OPENMP_RUNTIME.match(Path(p).name)]
    return len(runtimes) == 1 and runtimes[0].name == "libgomp.so.1"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("LORAQ_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loraq" / "kernels"


def build(source: Path, cc: str, openmp: bool = False) -> Path:
    """Compile ``source`` into a shared library in the cache (reused when already there and
    intact); with ``openmp``, with ``-fopenmp`` (see :func:`shares_torch_openmp`)."""
    flags = (*_FLAGS, "-fopenmp") if openmp else _FLAGS
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                " ".join(flags).encode(),
                version.encode(),
                platform.machine().encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if _intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    base = [cc, *flags, "-o", tmp, str(source)]
    try:
        errors = ""
        for extra in (["-march=native"], []):  # some compilers/targets refuse -march=native
            done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                _write_atomically(_digest_path(target), _digest(Path(tmp)).encode())
                os.replace(tmp, target)  # atomic: concurrent builders all end with a whole file
                return target
            errors = done.stderr.strip()[-500:]
        raise RuntimeError(f"{cc} failed to build {source.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _intact(library: Path) -> bool:
    """Whether the cached ``library`` is the file its build wrote, checked against the digest
    written next to it. Loading a damaged one is worse than an error: a truncated library whose
    header survived maps pages past the end of the file, and touching them kills the process
    (SIGBUS). A mismatch (or a cache from before digests) means: build again."""
    try:
        return _digest_path(library).read_text().strip() == _digest(library)
    except (OSError, UnicodeDecodeError):
        return False


def load_library(source: Path, purpose: str, openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled ``source``, or None (after one warning) when it cannot be built.

    ``purpose`` names what the kernel speeds up, for the warning; ``openmp`` builds it with
    OpenMP (pass :func:`shares_torch_openmp`). In mode ``off`` this returns None without
    building; in mode ``on`` a failed build raises :class:`KernelUnavailableError` instead of
    warning; an unknown mode raises ValueError (see :func:`mode`). Callers cache the result
    (one build and one warning per process).
    """
    selected = mode()
    if selected == "off":
        return None
    try:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found on PATH or in $CC")
        return ctypes.CDLL(str(build(source, cc, openmp)))
    except Exception as err:  # any failure means: use the pure-PyTorch path
        if selected == "on":
            reason = " ".join(str(err).split())
            raise KernelUnavailableError(
                f"{MODE_ENV}=on but the compiled {purpose} kernel is unavailable: {reason} "
                f"(set {MODE_ENV}=auto to fall back to pure PyTorch)"
            ) from err
        warnings.warn(
            f"loraq: compiled {purpose} unavailable ({err}); using the pure-PyTorch path "
            f"(set {MODE_ENV}=off to silence)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
