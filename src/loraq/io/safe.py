"""Reading and writing files safely: safetensors only, clear errors, nothing half-written.

Two rules hold for every file loraq reads or writes:

* Weights are read only through safetensors. Pickle files (``.bin``, ``.pt``, ...) can run code
  when loaded, so they are refused with a message that says how to convert them; they are never
  unpickled, not even with ``weights_only=True``.
* A write either completes or leaves the old files alone: each file goes to a temporary name in
  the same folder and is moved into place with ``os.replace`` (atomic on POSIX and Windows). A
  folder of several files is staged whole in a sibling folder first (:func:`staged_folder`, the
  one folder writer: adapters, 4-bit checkpoints, merged models, training checkpoints and
  results all go through it). A failed write removes its temporary file or folder; one left by a
  killed process (its name ends in the writer's pid) is removed by the next write to the same
  path. A full disk is reported as ``OSError(ENOSPC)`` naming the target, whatever the writer
  raised. Only a regular file (or a folder, for a folder) is ever replaced: a device node, FIFO
  or socket at the path is refused (:func:`check_replaceable`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: File name endings of pickle-based checkpoints, which loraq refuses to open.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class FormatError(ValueError):
    """A file or folder loraq cannot read; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------- reading
def refuse_pickle(path: str | os.PathLike[str]) -> NoReturn:
    """Raise :class:`FormatError` for a pickle checkpoint, explaining how to convert it."""
    path = Path(path)
    target = path.with_suffix(".safetensors")
    raise FormatError(
        f"{path} is a pickle file; loraq reads weights only from .safetensors files because "
        "unpickling can run arbitrary code, so it never opens this file. If you trust it, convert "
        "it once with:\n"
        f'  python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{path}', weights_only=True), '{target}', "
        "metadata={'format': 'pt'})\""
    )


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON object from ``path``; errors name the file and the position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise FormatError(f"{path} is not UTF-8 text ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError; name the file
        raise FormatError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    with handle as f:
        yield f


def read_safetensors(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file and its metadata; a corrupt file's error names it.

    The tensors may map the file; :func:`read_bytes` then :func:`parse_safetensors` gives
    tensors that own their memory (a later rewrite of the file cannot reach them)."""
    path = Path(path)
    with _open_safetensors(path) as f:
        try:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:
            raise FormatError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from None
        return tensors, dict(f.metadata() or {})


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of file ``path`` (as much as the file holds); errors name it."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise FormatError(f"{path} cannot be read: {err.strerror or err}") from None


def parse_safetensors(data: bytes, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's content ``data`` (read from ``path``, which errors
    name); they own their memory (copies of ``data``'s slices)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # safetensors' own error for a corrupt header or data
        raise FormatError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None


def read_safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``{key: (dtype, shape)}`` and metadata of a safetensors file, without reading the data."""
    path = Path(path)
    with _open_safetensors(path) as f:
        info = {}
        for key in f.keys():
            sl = f.get_slice(key)
            info[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        return info, dict(f.metadata() or {})


def weights_file(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder/name`` (a ``.safetensors`` file); refuses a folder that holds only pickles."""
    folder = Path(folder)
    path = folder / name
    if path.is_file():
        return path
    stem = name.removesuffix(".safetensors")
    stems = (stem, "pytorch_model") if stem == "model" else (stem,)
    for candidate in stems:
        for suffix in PICKLE_SUFFIXES:
            if (folder / (candidate + suffix)).is_file():
                refuse_pickle(folder / (candidate + suffix))
    raise FormatError(f"{folder} has no {name}")


# ---------------------------------------------------------------------------------- writing
def _temp_sibling(path: Path) -> Path:
    return _writer_sibling(path, "tmp")


_NODE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
)


def check_replaceable(path: str | os.PathLike[str], folder: bool = False) -> None:
    """Raise ``FileExistsError`` naming ``path`` unless it is absent or what a write may replace:
    a regular file (``folder=False``; through a symlink too) or a folder (``folder=True``).

    Replacing a device node (``/dev/null``), a FIFO or a socket by a regular file would break
    whatever uses it, so those are refused before any work is done.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return  # absent, or a dangling symlink that the write replaces
    except OSError:
        return  # unreadable: the write itself reports it with its reason
    if stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NODE_KINDS if test(mode)), "not a regular file")
    wanted = "a folder" if folder else "a regular file"
    raise FileExistsError(
        f"{path} exists and is not {wanted} (it is {kind}); refusing to replace it"
    )


@contextlib.contextmanager
def reporting_disk_full(target: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a full disk inside the body (:func:`is_disk_full`) as ``OSError(ENOSPC)``
    naming ``target``."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise OSError(errno.ENOSPC, "no space left on device", str(target)) from err
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    check_replaceable(path)
    tmp = _temp_sibling(path)
    try:
        with reporting_disk_full(path), open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that needs a file name (the ``gguf``
    package's writer, say); on normal exit it is synced and moved onto ``path`` with
    ``os.replace``. On an exception it is removed and ``path`` is untouched; a full disk is
    raised as ``OSError(ENOSPC)`` naming ``path``. ``path`` must be absent or a regular file
    (:func:`check_replaceable`); temporary files of dead writers of ``path`` are removed first."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans_of(path)
    tmp = _temp_sibling(path)
    try:
        with reporting_disk_full(path):
            yield tmp
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON (``indent=2``, sorted keys, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _unshare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights, views); copy the repeats.
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        span = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and span in seen:
            t = t.clone()
        elif t.numel():
            seen.add(span)
        out[key] = t
    return out


def atomic_save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save ``tensors`` as safetensors (metadata ``{"format": "pt"}`` by default) atomically."""
    path = Path(path)
    check_replaceable(path)
    meta = {"format": "pt", **(metadata or {})}
    tmp = _temp_sibling(path)
    try:
        with reporting_disk_full(path):
            save_file(_unshare(tensors), str(tmp), metadata=meta)
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Sibling folders a writer of ``<name>`` leaves only when killed mid-write: ``.tmp-`` ones are
#: half-written, ``.old-`` ones were being replaced (possibly half-deleted); the last part of
#: the name is the writer's process id (see :func:`remove_orphans`).
_ORPHAN = re.compile(r"\.(tmp|old)-(.+)-(\d+)")


def _writer_sibling(target: Path, kind: str) -> Path:
    token = secrets.token_hex(_SIBLING_TOKEN_BYTES)
    return target.with_name(f".{kind}-{target.name}-{token}-{os.getpid()}")


#: Random hex bytes in a writer's sibling name (two writers in one process never collide).
_SIBLING_TOKEN_BYTES = 4


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` means the disk is full: ``OSError`` ENOSPC/EDQUOT, a writer's own error
    saying so (safetensors' "os error 28" / ``StorageFull``), or numpy's short write
    ("N requested and M written", what the ``gguf`` writer's ``tofile`` raises)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    short_write = isinstance(err, OSError) and "requested and" in text and "written" in text
    rust = "os error 28" in text or "StorageFull" in text  # safetensors' io::Error
    return short_write or rust or "No space left on device" in text


def _merge_into(staging: Path, target: Path) -> None:
    # The target exists (and may hold other files we must keep): move file by file. Each move is
    # atomic; config files go last so a reader never sees a new config with old weights.
    files = sorted(
        (p for p in staging.rglob("*") if p.is_file()),
        key=lambda p: (p.name.endswith("config.json"), str(p)),
    )
    for src in files:
        dst = target / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def _swap_in(staging: Path, target: Path) -> None:
    # Two renames: a crash between them leaves no folder at ``target`` but a whole ``.old-`` one
    # beside it, never a mix of old and new files.
    old = _writer_sibling(target, "old")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty sibling folder ``.tmp-<name>-<id>-<pid>`` to write into; publish it on
    success. The one way loraq writes a folder of several files.

    When ``path`` does not exist yet, the staged folder is renamed to it (atomic). When it
    does: with ``replace`` the staged folder takes its place whole (the old one is renamed
    aside, then deleted); without, each staged file is moved in with ``os.replace``, leaving
    other files in ``path`` alone. On an exception the staging folder is removed and ``path``
    is untouched; a full disk is reported as ``OSError(ENOSPC)`` naming ``path``, whatever the
    writer raised.
    """
    target = Path(path)
    check_replaceable(target, folder=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans_of(target)
    staging = _writer_sibling(target, "tmp")
    staging.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        with reporting_disk_full(target):
            yield staging
            if not target.exists():
                os.replace(staging, target)  # one atomic rename of the whole folder
            elif replace:
                _swap_in(staging, target)
            else:
                _merge_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_folder(path: str | os.PathLike[str]) -> None:
    """Delete the folder ``path`` so that a crash midway leaves nothing that looks whole: it is
    first renamed to an ``.old-`` sibling (atomic), then removed."""
    doomed = _writer_sibling(Path(path), "old")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this process is not writing them now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_orphans(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what a process killed while writing into ``folder`` left; returns the removed.

    ``.tmp-<name>-...-<pid>`` folders are half-written (:func:`staged_folder`);
    ``.old-<name>-...-<pid>`` folders were being replaced or deleted (possibly half-deleted).
    Neither is ever read, so both go; folders of a process that is still running are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    for path in folder.iterdir():
        match = _ORPHAN.fullmatch(path.name)
        if match and path.is_dir() and not _pid_alive(int(match[3])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_orphans_of(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files and folders that writers of ``target`` killed mid-write left
    beside it (``.tmp-<name>-<hex>-<pid>``, ``.old-<name>-<hex>-<pid>`` of a process that is
    gone); returns the removed. Only ``target``'s own siblings are touched."""
    target = Path(target)
    token = f"[0-9a-f]{{{2 * _SIBLING_TOKEN_BYTES}}}"
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(target.name)}-{token}-(\d+)")
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            match = pattern.fullmatch(path.name)
            pid = int(match[2]) if match else None
            # this process's own may be in use by another of its threads
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def model_weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a transformers model folder (one file, or the shards listed in
    ``model.safetensors.index.json``); refuses a folder that holds only pickles."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index} has no 'weight_map' object")
        files = sorted({str(v) for v in weight_map.values()})
        for name in files:
            if Path(name).name != name:
                raise FormatError(f"{index} names a shard outside the folder: {name!r}")
            if not (folder / name).is_file():
                raise FormatError(f"{index} lists {name}, which is missing from {folder}")
        return [folder / name for name in files]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    shards = sorted(folder.glob("pytorch_model-*.bin"))
    if shards:
        refuse_pickle(shards[0])
    return [weights_file(folder, "model.safetensors")]  # raises: pickle only, or nothing
