"""What an evaluation ran on: data an accuracy means something on, and the images it left out.

``xcit-ssl knn`` and ``linear`` refuse data with fewer than two classes (every prediction would
be right: "100 %" that measures nothing), and report the images they actually evaluated: files
that fail to decode are left out, counted once each, and named in the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError

_NAMED_FILES = 20  # unreadable paths written into a result; the count is always complete


def check_classes(command: str, train: Dataset, data: Any) -> int | None:
    """The number of classes among the labels of ``train``; UserError below two. None when the
    dataset does not expose its labels (nothing to check without reading every sample)."""
    targets = getattr(train, "targets", None)
    if targets is None:
        return None
    labels = np.unique(np.asarray(targets))
    labels = labels[labels >= 0]
    where = f"{data.train_split} split of {data.root or data.dataset}"
    if len(labels) == 0:
        raise UserError(
            f"{command} needs labelled images, and the {where} has none (dataset {data.dataset}): use "
            f"--data.dataset imagefolder with class folders, <root>/{data.train_split}/<class>/<image>"
        )
    if len(labels) < 2:
        classes = list(getattr(train, "classes", []) or [])
        name = f" ('{classes[int(labels[0])]}')" if int(labels[0]) < len(classes) else ""
        raise UserError(
            f"{command} needs at least 2 classes, and the {where} has 1{name}: every prediction would be "
            "right and the accuracy 100 %. Point --data.root at a data set with several class folders"
        )
    return int(len(labels))


def _path_of(dataset: Dataset, index: int) -> str:
    inner, i = dataset, index
    while hasattr(inner, "indices") and hasattr(inner, "dataset"):  # (nested) subsets
        inner, i = inner.dataset, int(inner.indices[i])
    path = getattr(inner, "path", None)
    return str(path(i)) if callable(path) else f"#{index}"


def unreadable_record(splits: dict[str, Dataset], unreadable: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"train": n, "val": m, "files": [first paths]}`` for the result JSON."""
    files = [_path_of(splits[s], int(i)) for s in ("train", "val") for i in unreadable.get(s, torch.zeros(0))]
    return {**{s: int(len(unreadable.get(s, ()))) for s in ("train", "val")}, "files": files[:_NAMED_FILES]}


def evaluated_note(num_train: int, num_val: int, unreadable: dict[str, Any]) -> str:
    """``"18 train / 18 val images (2 unreadable files left out: ...)"`` for the footer of a result table."""
    left_out = int(unreadable.get("train", 0)) + int(unreadable.get("val", 0))
    text = f"{num_train} train / {num_val} val images evaluated"
    if left_out:
        shown = ", ".join(Path(p).name for p in unreadable.get("files", [])[:3])
        more = ", ..." if left_out > 3 else ""
        text += f" ({left_out} unreadable file{'s' if left_out > 1 else ''} left out: {shown}{more})"
    return text


def open_splits(d: Any) -> dict[str, Any]:
    """The train and val splits a protocol's ``data`` section names (``d``: a DataConfig or its
    namespace), subset as asked, under the evaluation policy for unreadable files (left out, not
    replaced); ``full_sizes`` before subsetting and ``num_classes`` when the dataset lists its classes."""
    from ..data.datasets import open_dataset, subset
    from ..data.images import skipping_unreadable  # noqa: PLC0415

    if d.dataset != "fashion_mnist" and not d.root:
        raise UserError(f"--data.root is required for dataset '{d.dataset}' (the folder holding "
                        f"{d.train_split}/ and {d.val_split}/)")  # fmt: skip
    if d.pad_to is not None and d.dataset != "fashion_mnist":
        # the fmnist protocols set it: name the flag that undoes it when they are pointed at other images
        raise UserError(f"data.pad_to={d.pad_to} pads Fashion-MNIST's 28 px images only (dataset '{d.dataset}' "
                        f"given): pass --data.pad_to null")  # fmt: skip
    train = open_dataset(d.dataset, d.root, d.train_split, pad_to=d.pad_to)
    train_classes = getattr(train, "classes", None)
    # val labels are indexed by the train classes, so a val split lacking a class still lines up
    extra = {"classes": train_classes} if d.dataset == "imagefolder" else {"pad_to": d.pad_to}
    val = open_dataset(d.dataset, d.root, d.val_split, **extra)
    sizes = {"train": len(train), "val": len(val)}
    if d.n_train and d.n_train < len(train):
        train = subset(train, d.n_train, d.seed)
    if d.n_val and d.n_val < len(val):
        val = subset(val, d.n_val, d.seed)
    # evaluation leaves unreadable files out (training replaces them by a neighbour)
    return {"train": skipping_unreadable(train), "val": skipping_unreadable(val), "full_sizes": sizes,
            "num_classes": len(train_classes) if train_classes is not None else None}  # fmt: skip


def resolved_root(d: Any) -> str | None:
    """The data root a result records: absolute for local folders (Fashion-MNIST's Debian folder
    when none is given), as given for URLs."""
    from ..data.datasets import FASHION_MNIST_ROOT  # noqa: PLC0415

    root = d.root or (FASHION_MNIST_ROOT if d.dataset == "fashion_mnist" else None)
    return str(Path(root).expanduser().resolve()) if root and "://" not in str(root) else root


def count_classes(train: Dataset) -> int:
    """1 + the largest label of ``train`` (its ``targets`` when it has them; otherwise every sample
    is read once, which decodes the images: small data sets only)."""
    labels = getattr(train, "targets", None)
    if labels is None:
        labels = [train[i][1] for i in range(len(train))]  # type: ignore[arg-type]
    return int(max(int(y) for y in labels)) + 1
