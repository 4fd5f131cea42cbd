"""Build a C kernel on first use and load it with :mod:`ctypes`.

Installing loraq needs no compiler. On first use a kernel source is compiled with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) for this CPU (``-march=native`` where the
compiler accepts it) into ``$LORAQ_CACHE_DIR`` (default ``~/.cache/loraq/kernels``), keyed by the
source, the flags, the compiler and the CPU, and written atomically. Without a compiler, or if
the build fails, loraq warns once per kernel and the caller keeps its pure-PyTorch path.

``LORAQ_KERNELS`` selects: ``auto`` (default: compiled if it builds), ``off`` (always pure
PyTorch), ``on`` (compiled, or raise).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["MODE_ENV", "build", "load_library", "mode"]

#: Environment variable choosing ``auto`` / ``off`` / ``on`` (see the module docstring).
MODE_ENV = "LORAQ_KERNELS"
# No contraction into FMA: the kernels' products and sums round separately, as the references.
_FLAGS = ("-O3", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
_OFF = ("off", "0", "false", "no")
_ON = ("on", "1", "true", "yes")


def mode() -> str:
    """The selected mode: ``auto``, ``off`` or ``on`` (from :data:`MODE_ENV`)."""
    value = os.environ.get(MODE_ENV, "auto").strip().lower()
    if value in _OFF:
        return "off"
    if value in _ON:
        return "on"
    return "auto"


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


def build(source: Path, cc: str) -> Path:
    """Compile ``source`` into a shared library in the cache (reused when already there)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                " ".join(_FLAGS).encode(),
                version.encode(),
                platform.machine().encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    base = [cc, *_FLAGS, "-o", tmp, str(source)]
    try:
        errors = ""
        for extra in (["-march=native"], []):  # some compilers/targets refuse -march=native
            done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders all end with a whole file
                return target
            errors = done.stderr.strip()[-500:]
        raise RuntimeError(f"{cc} failed to build {source.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, purpose: str) -> ctypes.CDLL | None:
    """The compiled ``source``, or None (after one warning) when it cannot be built.

    ``purpose`` names what the kernel speeds up, for the warning. In mode ``off`` this returns
    None without building; in mode ``on`` a failed build raises instead of warning. Callers
    cache the result (one build and one warning per process).
    """
    if mode() == "off":
        return None
    try:
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set $CC)")
        return ctypes.CDLL(str(build(source, cc)))
    except Exception as err:  # any failure means: use the pure-PyTorch path
        if mode() == "on":
            raise RuntimeError(
                f"{MODE_ENV}=on but the compiled kernel is unavailable: {err}"
            ) from err
        warnings.warn(
            f"loraq: compiled {purpose} unavailable ({err}); using the pure-PyTorch path "
            f"(set {MODE_ENV}=off to silence)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
