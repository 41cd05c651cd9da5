"""Every file xcit-ssl writes survives a failure in the middle of the write.

Each writer of the package is made to fail after its bytes went to disk and before the rename
(``fsync`` raises, as on a full disk): the old file must be intact, no temporary file left, and
the error one :class:`OutputError` naming the path. A writer that bypassed :mod:`xcit_ssl.files`
would replace the file and fail this test. Then the real thing: a size-limited tmpfs that fills
up, and a read-only mount (both need root, as the test machines give).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xcit_ssl.files as files
from xcit_ssl.files import OutputError, atomic_write, check_writable, sha256_file, write_json

OLD = b"the previous version of this file\n"


def _writers(tmp: Path) -> dict[str, tuple[Path, Callable[[], object]]]:
    """name -> (the file it replaces, the call that rewrites it), one per writer of the package."""
    from xcit_ssl.analysis.output import save_json, save_npy, save_png
    from xcit_ssl.analysis.plot import plot_run
    from xcit_ssl.evaluation.features import FeatureCache, FeatureSet
    from xcit_ssl.runs.checkpoints import AtomicCheckpointIO
    from xcit_ssl.runs.loggers import ResumePoint, truncate_csv

    run = tmp / "run"
    run.mkdir()
    cache = FeatureCache(tmp / "cache")
    feats = FeatureSet(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    data = tmp / "data.bin"
    data.write_bytes(b"abc")
    return {
        "checkpoint": (tmp / "last.ckpt", lambda: AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp / "last.ckpt")),
        "metrics csv": (tmp / "metrics.csv", lambda: truncate_csv(tmp / "metrics.csv", ResumePoint(step=5))),
        "result json": (tmp / "knn.json", lambda: write_json(tmp / "knn.json", {"top1": 1.0})),
        "feature cache": (cache.path("k"), lambda: cache.save("k", feats, {"what": "test"})),
        "sha256 index": (tmp / "index.json", lambda: sha256_file(data, tmp / "index.json")),
        "attention png": (tmp / "a.png", lambda: save_png(tmp / "a.png", Image.new("RGB", (4, 4)))),
        "attention npy": (tmp / "a.npy", lambda: save_npy(tmp / "a.npy", np.zeros(3))),
        "attention json": (tmp / "a.json", lambda: save_json(tmp / "a.json", {"a": 1})),
        "run plot": (run / "curves.png", lambda: plot_run(run)),
    }


@pytest.fixture
def failing_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``fsync`` of a file fails with ENOSPC: the bytes were written, the disk could not keep them."""

    def full(fd: int) -> None:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    yield


WRITER_NAMES = ["checkpoint", "metrics csv", "result json", "feature cache", "sha256 index", "attention png",
                "attention npy", "attention json", "run plot"]  # fmt: skip


@pytest.mark.parametrize("writer", WRITER_NAMES)
def test_a_failed_write_keeps_the_old_file(writer: str, tmp_path: Path, failing_fsync: None) -> None:
    target, write = _writers(tmp_path)[writer]
    target.parent.mkdir(parents=True, exist_ok=True)
    if writer == "metrics csv":
        old = b"step,loss\n1,0.5\n9,0.4\n"
    elif writer == "run plot":
        (target.parent / "metrics.csv").write_text("step,epoch,train/loss\n0,0,1.0\n1,0,0.5\n")
        old = OLD
    else:
        old = OLD
    target.write_bytes(old)
    with pytest.raises(OutputError, match=f"disk full writing {target}"):
        write()
    assert target.read_bytes() == old
    assert [p.name for p in target.parent.iterdir() if files.TMP_MARK in p.name] == []


def test_every_writer_is_covered(tmp_path: Path) -> None:
    assert sorted(_writers(tmp_path)) == sorted(WRITER_NAMES)


def test_a_finished_write_replaces_the_file_with_the_default_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(OLD)
    os.chmod(target, 0o600)
    umask = os.umask(0o022)
    try:
        write_json(target, {"a": 1})
    finally:
        os.umask(umask)
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o777 == 0o644  # what open() gives, not mkstemp's 0600


def test_an_exception_inside_the_block_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "wb") as fh:
            fh.write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_error_reading_a_source_is_not_blamed_on_the_output(tmp_path: Path) -> None:
    """Only a full, read-only or forbidden destination becomes an OutputError; a missing input read
    inside the block (a shard's source image) keeps its own error, and nothing is left behind."""
    target = tmp_path / "shard.tar"
    with pytest.raises(FileNotFoundError):
        with atomic_write(target, "wb") as fh:
            fh.write((tmp_path / "missing.jpg").read_bytes())
    assert list(tmp_path.iterdir()) == []


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (``64k``, ``8m``) at ``where``: writes past it fail with ENOSPC."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]):
        pytest.skip(f"needs root and mount(8): a {size} tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)  # lazy: a killed writer may hold a file


@contextmanager
def read_only_mount(where: Path) -> Iterator[Path]:
    """``where`` bind-mounted read-only onto itself: EROFS for everyone, root included (a chmod-0555
    folder is no test as root, who writes there anyway)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount(["--bind", str(where), str(where)]):
        pytest.skip("needs root and mount(8): a read-only bind mount")
    try:
        if not _mount(["-o", "remount,bind,ro", str(where)]):
            pytest.skip("this kernel refuses a read-only remount")
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "64k") as where:
        yield where


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "ro"
    where.mkdir()
    (where / "old.json").write_text('{"old": true}\n')
    with read_only_mount(where):
        yield where


def test_a_full_disk_is_one_clear_error(small_tmpfs: Path) -> None:
    target = small_tmpfs / "features.bin"
    target.write_bytes(OLD)
    with pytest.raises(OutputError) as caught:
        with atomic_write(target, "wb", needed=1 << 20) as fh:
            fh.write(os.urandom(1 << 20))
    message = str(caught.value)
    assert f"disk full writing {target}" in message and "bytes free" in message and "1,048,576 bytes needed" in message
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["features.bin"]


def test_a_read_only_folder_is_one_clear_error(read_only: Path) -> None:
    with pytest.raises(OutputError, match="read-only file system"):
        write_json(read_only / "old.json", {"new": True})
    assert json.loads((read_only / "old.json").read_text()) == {"old": True}
    with pytest.raises(OutputError, match=f"--out {read_only / 'sub'}: .* read-only file system; pass a writable"):
        check_writable(read_only / "sub", "--out")


def _big_writes(disk: Path) -> dict[str, tuple[Path, Callable[[], object]]]:
    """name -> (file, a write of 256 KiB into a 64 KiB disk), one per kind of writer's failure:
    torch.save raises ``RuntimeError: ... unexpected pos`` (no errno), safetensors a Rust error
    whose text holds ``os error 28``, NumPy an ``OSError`` without errno, json a plain ENOSPC."""
    from xcit_ssl.analysis.output import save_npy
    from xcit_ssl.evaluation.features import FeatureCache, FeatureSet
    from xcit_ssl.runs.checkpoints import AtomicCheckpointIO

    big = torch.zeros(1 << 16)
    cache = FeatureCache(disk)
    feats = FeatureSet(big.view(-1, 64), torch.zeros(1024, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    return {
        "checkpoint": (disk / "last.ckpt", lambda: AtomicCheckpointIO().save_checkpoint({"w": big}, disk / "last.ckpt")),
        "feature cache": (cache.path("k"), lambda: cache.save("k", feats, {"what": "test"})),
        "attention npy": (disk / "a.npy", lambda: save_npy(disk / "a.npy", np.zeros(1 << 15))),
        "result json": (disk / "knn.json", lambda: write_json(disk / "knn.json", {"x": "y" * (1 << 18)})),
    }


@pytest.mark.parametrize("writer", ["checkpoint", "feature cache", "attention npy", "result json"])
def test_every_writer_says_disk_full_on_a_real_full_disk(writer: str, small_tmpfs: Path) -> None:
    target, write = _big_writes(small_tmpfs)[writer]
    target.write_bytes(OLD)
    with pytest.raises(files.DiskFullError) as caught:
        write()
    message = str(caught.value)
    assert message.startswith(f"disk full writing {target}: ") and "bytes free" in message, message
    assert "bytes needed" in message and caught.value.exit_code == files.EXIT_DISK_FULL == 74
    assert 0 < caught.value.free <= 64 << 10  # what is free once the partial file is gone
    assert target.read_bytes() == OLD
    assert sorted(p.name for p in small_tmpfs.iterdir()) == [target.name]


def test_a_missing_source_on_a_full_disk_is_still_a_missing_source(small_tmpfs: Path, tmp_path: Path) -> None:
    """An errno, where given, decides: the full disk is not blamed for a file that does not exist."""
    with open(small_tmpfs / "filler", "wb") as fh:
        fh.write(os.urandom(60 << 10))
    with pytest.raises(FileNotFoundError):
        with atomic_write(small_tmpfs / "shard.tar", "wb") as fh:
            fh.write((tmp_path / "missing.jpg").read_bytes())
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]


def test_metrics_rows_on_a_full_disk_keep_the_whole_rows(small_tmpfs: Path) -> None:
    """metrics.csv is appended to (Lightning's writer): a full disk cuts off the half-written rows."""
    from xcit_ssl.runs.loggers import _ContinuingWriter

    writer = _ContinuingWriter(str(small_tmpfs), None)
    writer.log_metrics({"train/loss": 1.0}, step=0)
    writer.save()
    old = (small_tmpfs / "metrics.csv").read_bytes()
    for step in range(1, 5000):  # about 150 KB of rows for a 64 KiB disk
        writer.log_metrics({"train/loss": 1.0 / step}, step=step)
    with pytest.raises(files.DiskFullError, match=f"disk full writing {small_tmpfs / 'metrics.csv'}"):
        writer.save()
    assert (small_tmpfs / "metrics.csv").read_bytes() == old
