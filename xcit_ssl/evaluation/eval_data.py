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
