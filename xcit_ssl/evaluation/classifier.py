"""A classifier's top-1 / top-5 on a labelled split: the library half of ``xcit-ssl validate``.

:func:`load_classifier` reads a classifier (ours, timm, official XCiT, mmpretrain; a DINO file is
refused with the commands that do evaluate it), :func:`open_validation_split` the split under the
evaluation policy for unreadable files, :func:`evaluate_classifier` counts the hits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import open_dataset
from ..data.images import Unreadable
from ..errors import UserError
from .metrics import top1_top5_correct

log = logging.getLogger(__name__)

FMNIST_PAD = 32  # the demo recipes train on Fashion-MNIST zero-padded to 32 px


def load_classifier(source: Path, checkpoint_key: str, backbone: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier in eval mode and what the file records (``img_size``, ``mean``, ``std``)."""
    from ..models.checkpoints import load_backbone, read_state_dict
    from ..models.record import read_record

    _refuse_dino(source)  # before the checkpoint key: DINO's teacher/student would be asked for first
    state = read_state_dict(str(source), checkpoint_key=checkpoint_key)
    if "head.weight" not in state:
        raise UserError(
            f"{source} has no classifier head (a DINO checkpoint or an exported backbone?): validate needs a "
            "classifier; evaluate backbones with `xcit-ssl knn` or `xcit-ssl linear`"
        )
    model = load_backbone(str(source), checkpoint_key=checkpoint_key, name=backbone,
                          num_classes=int(state["head.weight"].shape[0]))  # fmt: skip
    record = read_record(source)
    found = {"img_size": record.img_size, "mean": record.mean and list(record.mean),
             "std": record.std and list(record.std)} if record else {}  # fmt: skip
    recorded = {k: v for k, v in found.items() if v}
    return model.eval(), recorded


def _refuse_dino(source: Path) -> None:
    """A DINO checkpoint (ours or the official one) or an export of a DINO backbone has no classifier."""
    from ..models.checkpoint_files import load_checkpoint_file
    from ..models.record import find_record

    obj, metadata = load_checkpoint_file(source)
    record = find_record(obj, metadata, source)
    state = obj.get("state_dict") if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else {}
    dino = (record is not None and record.method == "dino") or (
        isinstance(obj, dict) and {"teacher", "student"} <= set(obj)  # DINO's own checkpoints
    ) or any(str(k).startswith("teacher_backbone.") for k in state)
    if dino:
        raise UserError(
            f"{source} is a DINO checkpoint: DINO trains a backbone without a classifier head, so there is no "
            f"classifier to validate. Measure its features instead: xcit-ssl knn --checkpoint {source} "
            f"--data.root DATA (weighted k-NN), or xcit-ssl linear --checkpoint {source} --data.root DATA (linear probe)"
        )


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> dict[str, float]:
    """top-1 / top-5 (%) and mean cross-entropy of ``model`` over ``loader``."""
    hits1 = hits5 = 0
    loss_sum, n = 0.0, 0
    model.to(device)
    for images, labels in loader:
        if len(labels) == 0:  # every file of the batch was unreadable
            continue
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        top1, top5 = top1_top5_correct(logits, labels)
        hits1 += int(top1)
        hits5 += int(top5)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    if n == 0:
        raise UserError("the evaluation split holds no images")
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "loss": loss_sum / n, "num_images": n}


def collate_readable(samples: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, 3, H, W], labels [B])`` of the readable samples; the others are logged."""
    for image, _ in samples:
        if isinstance(image, Unreadable):
            log.warning("validate: left out unreadable image %s (%s)", image.path, image.reason)
    good = [(image, label) for image, label in samples if not isinstance(image, Unreadable)]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good], dtype=torch.int64)


def open_validation_split(cfg: Namespace, transform: Any) -> Any:
    """The ``--split`` of ``--data.*`` with ``transform``; ``--limit``: a class-stratified subset."""
    from ..data.datasets import subset

    d = cfg.data
    if d.dataset == "imagefolder":
        if not d.root:
            raise UserError("--data.root is required for imagefolder data (the folder holding train/ and val/)")
        if d.pad_to is not None:
            raise UserError(f"data.pad_to={d.pad_to} pads Fashion-MNIST's 28 px images only (dataset '{d.dataset}' "
                            f"given): pass --data.pad_to null")  # fmt: skip
        train_dir = Path(d.root) / "train"
        # index the classes like training did (sorted train folders) when the train split is there
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")) if (
            train_dir.is_dir() and cfg.split != "train") else None  # fmt: skip
        dataset = open_dataset("imagefolder", d.root, cfg.split, classes=classes)
    elif d.dataset == "fashion_mnist":
        dataset = open_dataset("fashion_mnist", d.root, cfg.split, pad_to=d.pad_to or FMNIST_PAD)
    else:  # the shard readers stream without random access by index; flat folders have no labels
        raise UserError(f"--data.dataset {d.dataset}: validate reads labelled image folders (imagefolder) or "
                        "fashion_mnist; pass the image folder the shards were written from")  # fmt: skip
    if cfg.limit:
        dataset = subset(dataset, cfg.limit, 0)
    return dataset.with_transform(transform)


