"""Files, once: atomic writes, hashing, and where a checkpoint's run folder is.

Every file xcit-ssl writes (checkpoints, metrics, exports, feature caches, shards, results,
pictures) goes through :func:`atomic_write` or :func:`atomic_path`: the bytes go to a temporary
file in the destination folder, which is flushed and fsynced, given the mode a plain ``open``
would give (``0666 & ~umask``; ``mkstemp``'s 0600 would hide an export from the rest of a lab),
renamed over the destination (``os.replace`` is atomic on one file system) and the folder is
fsynced so the rename survives a power cut. On any failure the temporary file is removed and the
old file, if any, is untouched. A full disk, a read-only mount or a folder without write
permission becomes one :class:`OutputError` that names the path and the fix, not a traceback.

    with atomic_write(path, "w") as fh:      # a file object
        json.dump(payload, fh)
    with atomic_path(path) as tmp:           # a path, for writers that open files themselves
        torch.save(obj, tmp)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import UserError

TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>-<random>" beside their destination


# errors that say the destination cannot take the file: full, over quota, read-only, not ours
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class OutputError(UserError):
    """An output could not be written: disk full, read-only mount, no permission."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def explain_os_error(err: OSError, path: Path, needed: int | None = None) -> OutputError:
    """One message for an ``OSError`` met while writing ``path``: what happened and what to do."""
    folder = path.parent
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        need = f", about {needed:,} bytes needed" if needed else ""
        return OutputError(f"disk full writing {path}: {free:,} bytes free in {folder}{need}; free space there "
                           "or write elsewhere. The previous file, if any, is intact")  # fmt: skip
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "is on a read-only file system" if err.errno == errno.EROFS else "is not writable"
        return OutputError(f"cannot write {path}: {folder} {what}; choose a writable output folder")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def check_writable(folder: Path, flag: str) -> None:
    """Raise :class:`OutputError` naming ``flag`` when ``folder`` (or its nearest existing parent,
    where it will be created) cannot be written: checked before the work, not after it."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {folder}: {probe} is a file, not a folder; pass a folder path")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".xcit-ssl-write-check")
    except OSError as err:
        why = "is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (
            "is on a read-only file system" if err.errno == errno.EROFS else "is not writable")
        raise OutputError(f"{flag} {folder}: {probe} {why}; pass a writable folder to {flag}") from None
    os.close(fd)
    os.unlink(name)


@contextmanager
def atomic_path(path: Path | str, needed: int | None = None, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens the file itself; on a clean exit
    it is fsynced, given the default file mode and renamed over ``path``. On any exception it is
    removed and ``path`` is left as it was. ``keep_suffix``: the temporary name ends in ``path``'s
    suffix too (``torch.export.save`` insists on ``.pt2``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix if keep_suffix else ""
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", suffix=suffix)
        os.close(fd)
    except OSError as err:
        raise explain_os_error(err, path, needed) from None
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the writer may have closed without flushing to the disk
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _DISK_ERRORS:  # the destination's fault; another OSError (a source file) is not
            raise explain_os_error(err, path, needed) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", needed: int | None = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only once the block finished (``mode``: ``w`` or ``wb``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path, needed) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()


def atomic_link(source: Path | str, path: Path | str) -> bool:
    """Make ``path`` the same file as ``source`` (a hard link, renamed into place: no second
    write); False where the file system has no hard links (the caller writes a copy instead)."""
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    fsync_dir(path.parent)
    return True


def write_text(path: Path | str, text: str) -> None:
    """Atomically replace ``path`` with ``text``."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: Path | str, payload: Any) -> None:
    """Atomically replace ``path`` with ``payload`` as indented JSON (non-JSON values as ``str``)."""
    with atomic_write(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.write("\n")


def remove_stale_temporaries(folder: Path, pattern: str = "*") -> int:
    """Delete temporary files (``.<name>.tmp-*``) a killed writer left in ``folder``; returns how many."""
    removed = 0
    for tmp in Path(folder).glob(f".{pattern}{TMP_MARK}*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: Path | str, index_path: Path | str | None = None, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks.

    With ``index_path`` the digest is remembered by (absolute path, size, mtime) in a small JSON
    file, so multi-GB checkpoints are hashed once; any change of size or mtime rehashes.
    """
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index: dict[str, Any] = {}
    if index_path is not None and Path(index_path).is_file():
        try:
            index = json.loads(Path(index_path).read_text())
        except (OSError, json.JSONDecodeError):
            index = {}  # a damaged index only costs a rehash
        entry = index.get(str(path))
        if entry and all(entry.get(k) == v for k, v in stamp.items()):
            return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    if index_path is not None:
        index[str(path)] = {**stamp, "sha256": hexdigest}
        write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    return hexdigest


def run_dir_of(weights: Path | str) -> Path:
    """The run folder of a weights file: ``runs/<name>/checkpoints/last.ckpt`` -> ``runs/<name>``;
    any other file -> its own folder (an export lives beside its results)."""
    weights = Path(weights)
    return weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent
