"""What our Lightning checkpoints carry besides Lightning's own state.

``checkpoint["xcit_ssl"]``, a :class:`~xcit_ssl.models.record.BackboneRecord`, names the backbone
variant and its overrides, so evaluation and export rebuild the right network from a checkpoint
alone, and records the training resolution and normalisation a downstream user needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ..data.datasets import FASHION_MNIST_ROOT
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..models.record import BackboneRecord

logger = logging.getLogger(__name__)


def backbone_record(backbone: nn.Module, method: str, trainer: L.Trainer | None) -> BackboneRecord:
    """The record of a run: backbone name/overrides, method, image size, mean/std, recipe, and
    (``extra["train_data"]``) the training images when a data module says which.

    Image size and normalisation come from the training transform when the trainer has one
    (what the weights actually saw), else from the backbone and ImageNet's statistics.
    """
    img_size = getattr(backbone, "img_size", None)
    mean, std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    recipe, extra = None, {}
    if trainer is not None:
        data = train_data(getattr(trainer, "datamodule", None))
        extra = {"train_data": data} if data else {}
        transform = getattr(getattr(trainer, "datamodule", None), "train_transform", None)
        for attr in ("global_crop_size", "crop_size", "img_size"):
            if getattr(transform, attr, None):
                img_size = int(getattr(transform, attr))
                break
        if getattr(transform, "mean", None) is not None:
            mean = tuple(float(v) for v in transform.mean)
        if getattr(transform, "std", None) is not None:
            std = tuple(float(v) for v in transform.std)
        recipe = getattr(trainer.lightning_module, "recipe", None)
    return BackboneRecord(
        architecture=getattr(backbone, "variant_name", None),
        overrides=dict(getattr(backbone, "build_args", {})),
        img_size=img_size, mean=mean, std=std, method=method, recipe=recipe, extra=extra,
    )  # fmt: skip


def train_data(datamodule: Any) -> dict[str, Any] | None:
    """What a run trains on, for the model card of its exports: ``dataset``, ``root`` (absolute for
    local folders), ``train_split``, ``num_images`` (per epoch, ``limit_train_samples`` applied) and ``pad_to``
    when the images were zero-padded to that size;
    None without a data module that counts its images."""
    # asked of the class: the instance's property opens the data set
    if datamodule is None or not hasattr(type(datamodule), "num_train_samples"):
        return None
    try:
        images: int | None = int(datamodule.num_train_samples)
    except (UserError, OSError, TypeError, ValueError):
        images = None  # a data set that cannot be opened here: the rest is still worth recording
    dataset = getattr(datamodule, "dataset", None)
    root = getattr(datamodule, "root", None) or (FASHION_MNIST_ROOT if dataset == "fashion_mnist" else None)
    if root is not None and "://" not in str(root):
        root = str(Path(root).expanduser().resolve())
    record = {"dataset": dataset, "root": root, "train_split": getattr(datamodule, "train_split", None),
              "num_images": images}  # fmt: skip
    if getattr(datamodule, "pad_to", None):  # Fashion-MNIST's 28 px zero-padded, not resized: users must pad too
        record["pad_to"] = int(datamodule.pad_to)
    return record


def backbone_spec(backbone: nn.Module, method: str, trainer: L.Trainer | None) -> dict[str, Any]:
    """The ``xcit_ssl`` checkpoint entry (see :meth:`BackboneRecord.to_checkpoint_entry`)."""
    return backbone_record(backbone, method, trainer).to_checkpoint_entry()


def save_last_good(trainer: L.Trainer) -> Path:
    """Write the current (pre-update) state to ``<run>/checkpoints/last_good.ckpt`` and return it."""
    path = Path(trainer.default_root_dir) / "checkpoints" / "last_good.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)  # Lightning writes atomically (temporary file + move)
    logger.error("saved the last good state to %s", path)
    return path


def stop_if_not_finite(module: L.LightningModule, loss: Tensor, advice: str) -> None:
    """Stop training on a NaN/inf loss on any rank, after saving the last good state.

    The parameters have not been updated by this step yet, so what is saved is the state that
    produced the last finite loss. All ranks agree on the decision, so none is left waiting.
    """
    bad = not bool(torch.isfinite(loss.detach()))
    bad = module.trainer.strategy.reduce_boolean_decision(bad, all=False)
    if bad:
        path = save_last_good(module.trainer)
        raise UserError(
            f"non-finite {type(module).__name__} loss at epoch {module.current_epoch}, step "
            f"{module.global_step}. The last good state is saved in {path}. {advice}; resume with "
            "--ckpt_path pointing at that file"
        )
