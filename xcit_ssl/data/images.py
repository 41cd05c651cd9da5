"""Image files, once: which files are images, how they are listed and decoded, and what happens
when one does not decode.

:class:`ImageFileDataset` is the base of every file-backed data set (ImageNet-layout folders, flat
folders, WebDataset and litdata shards): a compact table of paths, int64 labels, a transform, and
the skip-and-count policy for unreadable files.

Unreadable files. A multi-day run must not die on one corrupt JPEG, so a file that fails to
decode is replaced by the next readable index. Which files were found unreadable lives in shared
memory (one byte per sample, :class:`SkipCounter`), so each is logged once with its path and
counted once (``num_skipped``: distinct files) however often it is drawn, in whichever DataLoader
worker, forked or spawned: a damaged run of 18 consecutive members gives 18 warnings, not the
171 that re-logging every bad neighbour on the way to a readable one would. Evaluation must not
count a neighbour twice, so it opens its data with :func:`skipping_unreadable`: an unreadable file
comes back as :class:`Unreadable`, and the evaluation leaves it out and reports it once.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from xcit_ssl.errors import UserError

log = logging.getLogger(__name__)

# The one list of image file suffixes (lower case, with the dot): folders, shards and analysis.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

# Decoding errors PIL raises for broken files (UnidentifiedImageError and truncation are OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_MAX_CONSECUTIVE_FAILURES = 100


def is_image(name: str) -> bool:
    """Whether a file name has an image suffix (case-insensitive) and is not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_images(folder: Path) -> list[str]:
    """All image files under ``folder``, recursively, sorted (deterministic across machines)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f))
    return found


def load_rgb(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """The decoded RGB image of a file or of an in-memory file (a tar member's bytes); raises one of
    :data:`DECODE_ERRORS` when it does not decode."""
    with Image.open(source) as image:
        # convert() forces the full decode, so a truncated file fails here rather than later.
        return image.convert("RGB")


class SkipCounter:
    """Which samples were found unreadable, shared by the main process and its DataLoader workers
    (fork, spawn or forkserver): one byte per sample, so the total is a count of distinct files.

    Marking sets a byte to 1 and nothing else (no read-modify-write of a shared total), so workers
    need no lock and never lose a mark; two workers meeting the same file at once both set the
    same byte. Pickled while a child process is being started it shares the memory; pickled
    otherwise (deepcopy, torch.save) it becomes an independent record with the same marks.
    """

    def __init__(self, size: int, marks: bytes | None = None) -> None:
        self._flags = multiprocessing.RawArray("B", max(size, 1))
        if marks is not None:
            self._flags[: len(marks)] = marks

    def mark(self, index: int) -> bool:
        """Record sample ``index`` as unreadable; True the first time (the caller then logs it)."""
        if self._flags[int(index)]:
            return False
        self._flags[int(index)] = 1
        return True

    def __contains__(self, index: int) -> bool:
        return bool(self._flags[int(index)])

    @property
    def value(self) -> int:
        """Distinct samples marked so far, by every process."""
        return int(np.count_nonzero(np.frombuffer(self._flags, dtype=np.uint8)))

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"flags": self._flags}
        return {"size": len(self._flags), "marks": bytes(self._flags)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "flags" in state:
            self._flags = state["flags"]
        else:
            self.__init__(state["size"], state["marks"])  # type: ignore[misc]


class _PathTable:
    """File paths packed into one byte buffer plus offsets.

    A Python list of 1.3M str objects is touched (refcounts) by every worker and so copied page
    by page into each forked process; two numpy arrays are not.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._buffer[start:end].tobytes())


@dataclass(frozen=True)
class Unreadable:
    """In place of the image of a file that failed to decode, from a dataset opened for evaluation
    (:func:`skipping_unreadable`); evaluation leaves the sample out and counts the file."""

    path: str
    reason: str


def skipping_unreadable(dataset: Dataset) -> Dataset:
    """``dataset`` under the evaluation policy: an unreadable file gives ``(Unreadable, label)``
    instead of being replaced by the next sample (training's policy), so a k-NN bank or a probe's
    data never holds a neighbour twice. Datasets that cannot fail (Fashion-MNIST) come back as they are."""
    method = getattr(dataset, "skipping_unreadable", None)
    return method() if callable(method) else dataset


class ImageFileDataset(Dataset):
    """Image files with integer labels, skipping (and counting) files that fail to decode.

    ``dataset[i]`` is ``(transform(image), label)``: ``image`` an RGB PIL image, ``label`` an int
    (-1 when unlabelled). Subclasses that read from elsewhere than a file path (tar members, litdata
    items) override :meth:`_load`; ``paths`` then only names the samples in messages.
    """

    skip_unreadable = False  # the evaluation policy (skipping_unreadable); training replaces

    def __init__(
        self, paths: Sequence[str], targets: np.ndarray, classes: list[str], transform: Callable | None
    ) -> None:
        self._paths = _PathTable(paths)
        self.targets = targets.astype(np.int64)
        self.classes = classes
        self.transform = transform
        self._skips = SkipCounter(len(self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def num_skipped(self) -> int:
        """Distinct files found unreadable and replaced so far (all processes; each counted once)."""
        return self._skips.value

    def path(self, index: int) -> str:
        return self._paths[index]

    def _load(self, index: int) -> Image.Image:
        """The decoded RGB image of ``index`` (raises one of the decode errors when unreadable)."""
        return load_rgb(self._paths[index])

    def with_transform(self, transform: Callable | None) -> ImageFileDataset:
        """A shallow copy with another transform, sharing the file index and the skip counter."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def skipping_unreadable(self) -> ImageFileDataset:
        """A shallow copy under the evaluation policy (see :func:`skipping_unreadable`)."""
        other = copy.copy(self)
        other.skip_unreadable = True
        return other

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.skip_unreadable:
            try:
                image = self._load(index)
            except DECODE_ERRORS as error:  # logged once per file by whoever drops it
                return Unreadable(self._paths[index], f"{type(error).__name__}: {error}"), int(self.targets[index])
            return (self.transform(image) if self.transform is not None else image), int(self.targets[index])
        first = index
        for _ in range(min(len(self), _MAX_CONSECUTIVE_FAILURES)):
            if index in self._skips:  # found unreadable before (here or in another worker): not again
                index = (index + 1) % len(self)
                continue
            try:
                image = self._load(index)
            except DECODE_ERRORS as error:
                if self._skips.mark(index):
                    log.warning(
                        "Skipping unreadable image %s (%s: %s); using the next readable sample instead "
                        "(%d unreadable so far; each is reported once).",
                        self._paths[index], type(error).__name__, error, self._skips.value,
                    )  # fmt: skip
                index = (index + 1) % len(self)
                continue
            label = int(self.targets[index])
            return (self.transform(image) if self.transform is not None else image), label
        raise UserError(
            f"{min(len(self), _MAX_CONSECUTIVE_FAILURES)} consecutive images starting at "
            f"{self._paths[first]} could not be decoded: the data folder looks damaged. Check the "
            "files (e.g. `python -c \"from PIL import Image; Image.open(PATH).load()\"`) or re-copy them."
        )
