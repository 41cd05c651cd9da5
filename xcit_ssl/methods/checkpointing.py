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
import torch
from torch import Tensor, nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError

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
