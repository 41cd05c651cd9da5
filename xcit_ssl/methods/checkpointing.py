"""What our Lightning checkpoints carry besides Lightning's own state.

``checkpoint["xcit_ssl"]`` names the backbone variant and its overrides, so evaluation and export
rebuild the right network from a checkpoint alone, and records the training resolution and
normalisation a downstream user needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


def backbone_spec(backbone: nn.Module, method: str, trainer: L.Trainer | None) -> dict[str, Any]:
    """The ``xcit_ssl`` checkpoint entry: backbone name/overrides, method, image size, mean/std, recipe."""
    overrides = dict(getattr(backbone, "build_args", {}))
    spec: dict[str, Any] = {
        "backbone": {"name": getattr(backbone, "variant_name", None), "overrides": overrides},
        "method": method,
        "img_size": getattr(backbone, "img_size", None),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "recipe": None,
    }
    if trainer is not None:
        transform = getattr(getattr(trainer, "datamodule", None), "train_transform", None)
        for attr in ("global_crop_size", "crop_size", "img_size"):
            if getattr(transform, attr, None):
                spec["img_size"] = int(getattr(transform, attr))
                break
        for attr in ("mean", "std"):
            if getattr(transform, attr, None) is not None:
                spec[attr] = [float(v) for v in getattr(transform, attr)]
        spec["recipe"] = getattr(trainer.lightning_module, "recipe", None)
    return spec


def save_last_good(trainer: L.Trainer) -> Path:
    """Write the current (pre-update) state to ``<run>/checkpoints/last_good.ckpt`` and return it."""
    path = Path(trainer.default_root_dir) / "checkpoints" / "last_good.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)  # Lightning writes atomically (temporary file + move)
    logger.error("saved the last good state to %s", path)
    return path
