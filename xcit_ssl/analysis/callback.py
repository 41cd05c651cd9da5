"""Attention and PCA sheets of a fixed set of validation images during ``fit``: a Lightning callback.

Every ``every_n_epochs`` training epochs, on rank 0 only (no collectives: other ranks carry on),
it runs the teacher backbone (``pl_module.teacher_backbone``, else ``pl_module.backbone``) in
eval mode under ``torch.no_grad`` on ``n_images`` images of the datamodule's labelled eval data
(``eval_dataset("val")``, else ``"train"``; a class-stratified subset fixed by ``seed``), and
writes the sheets of :mod:`xcit_ssl.analysis.sheets` to ``<run>/attention/epoch_NNNN/`` and, stacked
into one image per kind, to every TensorBoard logger (``attention/sheets``, ``attention/pca``).
``NNNN`` is the 0-based epoch index (``trainer.current_epoch``) that ``checkpoints/epoch_NNNN.ckpt``,
the ``epoch`` column of ``metrics.csv`` and the log lines use: after the 10th epoch the sheets go to
``epoch_0009/`` beside ``epoch_0009.ckpt``.
Every submodule's train/eval flag is restored afterwards, and eval mode leaves BatchNorm's
running statistics as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .images import denormalise
from .output import save_png
from .sheets import stack_sheets
from .snapshot import analyse_images

log = logging.getLogger(__name__)


class AttentionSnapshots(pl.Callback):
    """Render attention (and PCA) sheets of fixed eval images every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: draw after every this many training epochs (and never during sanity checks).
        n_images: how many images (a stratified subset of the eval split, the same every time).
        block: class-attention block to read (-1: the last).
        threshold: share of attention mass the masks keep (DINO: 0.6).
        pca: also draw the patch-feature PCA sheets (fitted over the ``n_images`` images).
        split: ``"val"`` (falls back to ``"train"`` when the data has no validation split) or ``"train"``.
        seed: chooses the subset.
        tensorboard: also log the stacked sheets to TensorBoard loggers.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        n_images: int = 8,
        block: int = -1,
        threshold: float = 0.6,
        pca: bool = True,
        split: str = "val",
        seed: int = 0,
        tensorboard: bool = True,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or n_images < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs}, n_images={n_images}: both must be >= 1")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold}: give a share of attention mass in (0, 1]")
        if split not in ("val", "train"):
            raise ValueError(f"split={split!r}: use 'val' or 'train'")
        self.every_n_epochs, self.n_images, self.block = every_n_epochs, n_images, block
        self.threshold, self.pca, self.split, self.seed, self.tensorboard = threshold, pca, split, seed, tensorboard
        self._images: Tensor | None = None
        self.last_dir: Path | None = None

    def _fixed_images(self, trainer: pl.Trainer) -> Tensor | None:
        """``[n, 3, S, S]`` eval-transformed images, read once and kept (on the CPU)."""
        if self._images is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "eval_dataset"):
                log.warning("AttentionSnapshots: the datamodule has no eval_dataset(); no sheets are drawn")
                return None
            ds = dm.eval_dataset(self.split, limit=self.n_images, seed=self.seed)
            if ds is None and self.split == "val":
                ds = dm.eval_dataset("train", limit=self.n_images, seed=self.seed)
            if ds is None:
                log.warning("AttentionSnapshots: the data has no labelled eval split; no sheets are drawn")
                return None
            n = min(self.n_images, len(ds))
            self._images = torch.stack([ds[i][0] for i in range(n)])
        return self._images

    @staticmethod
    def _mean_std(trainer: pl.Trainer) -> tuple[Sequence[float], Sequence[float]]:
        transform = getattr(getattr(trainer, "datamodule", None), "train_transform", None)
        return getattr(transform, "mean", None) or IMAGENET_MEAN, getattr(transform, "std", None) or IMAGENET_STD

    @staticmethod
    def backbone_of(pl_module: pl.LightningModule) -> nn.Module:
        backbone = getattr(pl_module, "teacher_backbone", None)
        return backbone if backbone is not None else pl_module.backbone

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Render now and write ``<run>/attention/epoch_NNNN/`` (``NNNN``: the current 0-based epoch,
        as in checkpoint names); returns that folder (None if no data)."""
        images = self._fixed_images(trainer)
        if images is None:
            return None
        backbone = self.backbone_of(pl_module)
        modes = {m: m.training for m in backbone.modules()}
        backbone.eval()
        try:
            results = analyse_images(backbone, list(images), list(denormalise(images, *self._mean_std(trainer))),
                                     block=self.block, threshold=self.threshold, pca=self.pca)  # fmt: skip
        finally:
            for m, mode in modes.items():
                m.train(mode)
        epoch = trainer.current_epoch  # 0-based, as checkpoints/epoch_NNNN.ckpt and metrics.csv count
        folder = Path(trainer.default_root_dir) / "attention" / f"epoch_{epoch:04d}"
        for i, res in enumerate(results):
            save_png(folder / f"attention_{i:02d}.png", res.attention_sheet)
            if res.pca_sheet is not None:
                save_png(folder / f"pca_{i:02d}.png", res.pca_sheet)
        if self.tensorboard:
            stacks = {"attention/sheets": stack_sheets([r.attention_sheet for r in results])}
            if self.pca:
                stacks["attention/pca"] = stack_sheets([r.pca_sheet for r in results if r.pca_sheet is not None])
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for tag, img in stacks.items():
                        logger.experiment.add_image(tag, np.asarray(img), global_step=trainer.global_step,
                                                    dataformats="HWC")  # fmt: skip
        log.info("epoch %d: attention sheets of %d images in %s", epoch, len(results), folder)
        self.last_dir = folder
        return folder

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        if trainer.is_global_zero:
            self.draw(trainer, pl_module)
