"""Files, once: atomic writes, hashing, and where a checkpoint's run folder is.

Every file xcit-ssl writes (checkpoints, metrics, exports, feature caches, shards, results,
pictures) goes through :func:`atomic_write` or :func:`atomic_path`: the bytes go to a temporary
file in the destination folder, which is flushed and fsynced, given the mode a plain ``open``
would give (``0666 & ~umask``; ``mkstemp``'s 0600 would hide an export from the rest of a lab),
renamed over the destination (``os.replace`` is atomic on one file system) and the folder is
fsynced so the rename survives a power cut. On any failure the temporary file is removed and the
old file, if any, is untouched. A read-only mount or a folder without write permission becomes
one :class:`OutputError` (exit code 2) that names the path and the fix, not a traceback; a full
disk one :class:`DiskFullError` (exit code 74), recognised by its errno or, for writers that give
none (torch.save's ``RuntimeError``), by the destination's file system being full after the
failure. :func:`check_writable` refuses an unwritable output folder before the work starts.

    with atomic_write(path, "w") as fh:      # a file object
        json.dump(payload, fh)
    with atomic_path(path) as tmp:           # a path, for writers that open files themselves
        torch.save(obj, tmp)
    with atomic_dir(folder) as tmp:          # a folder of files, moved into place as one
        write_json(tmp / "config.json", cfg)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
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
#: exit code of a full disk (sysexits EX_IOERR): not a crash (1), not a bad input (2)
EXIT_DISK_FULL = 74
# a file system with less free space than this after a failed write was full: torch.save's
# RuntimeError and NumPy's short-write OSError carry no errno, and a failed write fills the disk
# to its last block before it fails
_FULL_BYTES = 1 << 20
# errno in the text of writers that report it as a string (safetensors' Rust io::Error, C++ streams)
_ERRNO_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)|\[Errno (\d+)\]")
_STRERROR = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
             errno.EROFS: "Read-only file system"}  # fmt: skip


class OutputError(UserError):
    """An output could not be written: read-only mount, no permission (exit code 2)."""


class DiskFullError(OutputError):
    """The destination's file system is full or over quota (exit code 74, ``EX_IOERR``).

    ``free``: bytes free there now (after the partial file was removed); ``needed``: the writer's
    estimate of the file's size, else None; ``written``: bytes that reached the disk before it
    filled (a lower bound of the size), else None. Nothing already written was replaced.
    """

    exit_code = EXIT_DISK_FULL

    # defaults for all but the message: an exception must unpickle from its args (DataLoader workers)
    def __init__(self, message: str, path: Path | str | None = None, free: int = 0, needed: int | None = None,
                 written: int | None = None, every_rank: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.free, self.needed, self.written, self.every_rank = int(free), needed, written, every_rank


def needed_text(needed: int | None, written: int | None) -> str:
    """``about N bytes needed`` (an estimate), ``more than N bytes needed`` (what fitted), or ``""``."""
    if needed:
        return f"about {needed:,} bytes needed"
    return f"more than {written:,} bytes needed" if written else ""


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


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use in ``folder``'s file system (0 if it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def explain_os_error(err: OSError, path: Path, needed: int | None = None, written: int | None = None,
                     free: int | None = None) -> OutputError:  # fmt: skip
    """One message for an ``OSError`` met while writing ``path``: what happened and what to do.
    ``free``: the bytes free in its folder (default: measured now)."""
    folder = path.parent
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        free = free_bytes(folder) if free is None else free
        need = needed_text(needed, written)
        what = "disk full" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return DiskFullError(f"{what} writing {path}: {free:,} bytes free in {folder}{need and ', ' + need}; free "
                             "space there or write elsewhere. The previous file, if any, is intact",
                             path, free, needed, written)  # fmt: skip
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "is on a read-only file system" if err.errno == errno.EROFS else "is not writable"
        return OutputError(f"cannot write {path}: {folder} {what}; choose a writable output folder")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def _errno_in(err: BaseException) -> int | None:
    """The errno an exception (or one it was raised from) carries, as a number or in its text."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        match = _ERRNO_TEXT.search(str(current))
        if match:
            return int(next(g for g in match.groups() if g))
        for code, text in _STRERROR.items():
            if text in str(current):
                return code
        current = current.__cause__ or current.__context__
    return None


def disk_error_of(err: BaseException, folder: Path) -> int | None:
    """The errno of ``err`` when it says the destination cannot take the file, else None.

    An errno, where the writer gives one, decides (a missing source file is not the output's
    fault); without one (torch.save's ``RuntimeError: ... unexpected pos``, NumPy's short write)
    a file system left with almost no free space was full.
    """
    if not isinstance(err, Exception):
        return None  # KeyboardInterrupt, SystemExit: not the disk
    code = _errno_in(err)
    if code is None and Path(folder).is_dir() and free_bytes(folder) < _FULL_BYTES:
        code = errno.ENOSPC
    return code if code in _DISK_ERRORS else None


def as_output_error(err: BaseException, path: Path | str) -> OutputError | None:
    """``err``, met writing ``path`` in place (an appended log), as the :class:`OutputError` it
    means when the destination could not take the bytes; None when it is another failure."""
    code = None if isinstance(err, OutputError) else disk_error_of(err, Path(path).parent)
    return None if code is None else explain_os_error(OSError(code, os.strerror(code)), Path(path))


def check_writable(folder: Path | str, flag: str, given: Path | str | None = None) -> None:
    """Raise :class:`OutputError` naming ``flag`` and ``given`` (its value; default ``folder``) when
    ``folder`` (or its nearest existing parent, where it will be created) cannot be written:
    checked before the work, not after it. A full disk raises :class:`DiskFullError`."""
    shown = folder if given is None else given
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {shown}: {probe} is a file, not a folder; pass a folder path")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".xcit-ssl-write-check")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{flag} {shown}: {probe} is full ({free_bytes(probe):,} bytes free); free space "
                                f"there or pass another folder to {flag}", probe, free_bytes(probe)) from None  # fmt: skip
        why = "is on a read-only file system" if err.errno == errno.EROFS else "is not writable"
        raise OutputError(f"{flag} {shown}: {probe} {why}; pass a writable folder to {flag}") from None
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
    except BaseException as err:
        # judged while the partial file still holds its bytes: removing it frees the disk again
        written = tmp.stat().st_size if tmp.exists() else None
        code = None if isinstance(err, OutputError) else disk_error_of(err, path.parent)
        # the free space once the partial file is gone: a failed writer (torch.save) may still hold
        # it open, and its blocks come back only when that writer is collected
        free = free_bytes(path.parent) + (written or 0) if code is not None else None
        tmp.unlink(missing_ok=True)
        if code is None:  # not the destination's fault (a source file, a bug, Ctrl-C): as it is
            raise
        raise explain_os_error(OSError(code, os.strerror(code)), path, needed, written, free) from err
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


@contextmanager
def atomic_dir(path: Path | str, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill (with :func:`atomic_write`, :func:`atomic_path`:
    each file fsynced); on a clean exit it takes ``path``'s place by one rename, so a reader finds
    the whole folder or none of it. On any exception it is removed and ``path`` is left as it was.

    ``path`` may be absent or an empty folder. A folder with files in it is replaced only with
    ``replace``: it is renamed aside, the new one renamed in, then the old one deleted (a failed
    second rename renames the old one back). The caller decides beforehand whether its contents
    may go; this helper never deletes a folder it was not told to replace. The new folder gets the
    mode ``mkdir`` gives (``0777 & ~umask``, not ``mkdtemp``'s 0700).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}{os.getpid()}-"))
    except OSError as err:
        raise explain_os_error(err, path) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        fsync_dir(tmp)
        _move_dir_into_place(tmp, path, replace)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        code = None if isinstance(err, OutputError) else disk_error_of(err, path.parent)
        if code is None:
            raise
        raise explain_os_error(OSError(code, os.strerror(code)), path) from err
    fsync_dir(path.parent)


def _move_dir_into_place(tmp: Path, path: Path, replace: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"{path} exists and is not a folder; choose another output folder")
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # rename(2) may replace an empty folder, but not on every system
    if not path.exists():
        os.replace(tmp, path)
        return
    if not replace:
        raise OutputError(f"{path} was filled while this output was written; nothing was replaced")
    old = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """Delete temporary files (``.<name>.tmp-*``) and folders (:func:`atomic_dir`) a killed writer
    left in ``folder``; returns how many."""
    removed = 0
    for tmp in Path(folder).glob(f".{pattern}{TMP_MARK}*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
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
