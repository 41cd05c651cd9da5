"""The configured data: does it exist, can its files be read, and how fast does the pipeline run.

The training split is opened by the data module itself (``train_dataset()``: the same folder scan,
errors and transform as ``fit``). A sample of it, spread evenly over the set, is then read through a
``DataLoader`` with the configured ``num_workers``, the real training transform (decode +
multi-crop or the supervised augmentation), training's per-sample seeding and default collation,
for a few seconds: images/s
counts the batches after the first one of each worker (which include the workers' start-up).
Unreadable files in the sample are counted by the data set's own skip counter (shared with the
workers), which is also what replaces them during training.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Subset

from ..errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What the data check found; ``status`` is ok, missing, empty, unreadable or error."""

    dataset: str
    root: str
    status: str
    message: str = ""
    num_samples: int | None = None
    read: int = 0  # images read through the loader
    unreadable: int = 0
    workers: int = 0
    batch_size: int = 0
    images_per_s: float | None = None
    seconds: float = 0.0
    photometric: str = "per_image"  # "device": the workers only decode and crop, the rest is in the step
    cores: int = field(default_factory=lambda: usable_cores())

    @property
    def per_core(self) -> float | None:
        """Images/s per busy core (the main process when ``workers`` is 0)."""
        if self.images_per_s is None:
            return None
        return self.images_per_s / max(1, min(max(1, self.workers), self.cores))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _describe_root(datamodule: Any) -> tuple[str, str]:
    kind = str(getattr(datamodule, "dataset", "?"))
    root = getattr(datamodule, "root", None)
    if root is None and kind == "fashion_mnist":
        from ..data.datasets import FASHION_MNIST_ROOT

        root = FASHION_MNIST_ROOT
    return kind, str(root)


def open_train(datamodule: Any) -> tuple[Any | None, DataReport]:
    """The training split with its transform, or None and why (missing / empty / error)."""
    kind, root = _describe_root(datamodule)
    report = DataReport(kind, root, "ok", workers=int(getattr(datamodule, "num_workers", 0)))
    report.photometric = str(getattr(getattr(datamodule, "train_transform", None), "photometric", "per_image"))
    if not hasattr(datamodule, "train_dataset"):
        report.status, report.message = "error", f"{type(datamodule).__name__} has no train_dataset(): not checked"
        return None, report
    split = getattr(datamodule, "train_split", None)
    folder = Path(root) / split if kind == "imagefolder" and split else Path(root)
    try:
        dataset = datamodule.train_dataset()
    except UserError as err:
        report.message = str(err)
        report.status = "missing" if not folder.exists() else "empty"
        return None, report
    report.num_samples = len(dataset)
    if report.num_samples == 0:
        report.status, report.message = "empty", f"{folder} holds no training images"
        return None, report
    return dataset, report


def _skipped(dataset: Any) -> int:
    return int(getattr(dataset, "num_skipped", 0) or 0)


def measure_pipeline(
    dataset: Any, report: DataReport, batch_size: int, seconds: float = 10.0, max_images: int | None = None,
    pin_memory: bool = False,
) -> DataReport:  # fmt: skip
    """Read a spread-out sample through the configured workers for about ``seconds``."""
    workers = report.workers
    batch = max(1, min(batch_size, 16))
    lanes = max(1, workers)
    # whole rounds of one batch per worker: the workers start together and stay in step, so a
    # round boundary is where a count of images and a clock agree (a small set is read again)
    rounds = max(4, math.ceil(512 / (lanes * batch)))
    n = max_images or lanes * rounds * batch
    spread = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    index = np.resize(spread, n).tolist()
    from ..data.resumable import SeededSamples  # training's per-sample seeding, whose cost is real

    loader = DataLoader(
        Subset(SeededSamples(dataset, seed=0), index), batch_size=batch, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, drop_last=False, persistent_workers=False,
    )  # fmt: skip
    skipped_before = _skipped(dataset)
    warm = lanes  # the first round carries the workers' start-up
    read = after_warm = 0
    start = first = last = time.perf_counter()
    for i, item in enumerate(loader):
        size = len(item[1]) if isinstance(item, (list, tuple)) and len(item) > 1 else batch
        read += size
        last = time.perf_counter()
        if i + 1 == warm:
            first = last
        elif i + 1 > warm:
            after_warm += size
        if last - start > seconds and i + 1 >= 2 * warm and (i + 1) % lanes == 0:
            break
    elapsed = last - first
    report.read, report.batch_size, report.seconds = read, batch, time.perf_counter() - start
    report.unreadable = _skipped(dataset) - skipped_before
    if report.unreadable and hasattr(dataset, "path"):
        # the skip counter also counts a replacement that failed in turn: name the files instead
        report.unreadable = _count_unreadable([dataset.path(i) for i in sorted(set(index))])
    if after_warm and elapsed > 0:
        report.images_per_s = after_warm / elapsed
    elif read:
        report.images_per_s = read / max(1e-9, report.seconds)
    if report.unreadable:
        report.status = "unreadable"
        report.message = (
            f"{report.unreadable} of {len(set(index))} sampled images could not be decoded (training replaces each by "
            "the next image)"
        )
    return report


def _count_unreadable(paths: list[str]) -> int:
    """How many of ``paths`` fail to decode, by the data sets' own decoder and error list."""
    from ..data.images import DECODE_ERRORS, load_rgb

    bad = 0
    for path in paths:
        try:
            load_rgb(path)
        except DECODE_ERRORS:
            bad += 1
    return bad


def check_data(datamodule: Any, seconds: float = 10.0, measure: bool = True, max_images: int | None = None) -> DataReport:
    """Open the training data and, with ``measure``, time the pipeline on a sample of it."""
    dataset, report = open_train(datamodule)
    if dataset is None or not measure:
        return report
    batch = int(getattr(datamodule, "batch_size", 16))
    pin = bool(getattr(datamodule, "pin_memory", False))
    try:
        with warnings.catch_warnings():  # the workers finding says it with the measured numbers
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            return measure_pipeline(dataset, report, batch, seconds, max_images, pin_memory=pin and _cuda())
    except UserError as err:  # e.g. 100 consecutive unreadable files
        report.status, report.message = "unreadable", str(err)
        return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def workers_needed(report: DataReport, images_per_s: float) -> int | None:
    """Workers that would feed ``images_per_s`` per device at the measured per-core rate."""
    rate = report.per_core
    if not rate:
        return None
    return max(1, math.ceil(images_per_s / rate))
