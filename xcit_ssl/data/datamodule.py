"""Lightning DataModule for pretraining: multi-crop training views, labelled evaluation data.

A training batch is ``(views, labels)``: ``views`` a list of ``2 + n_local_crops`` tensors
``[B, 3, S, S]`` (global views first), ``labels`` ``[B]`` int64 (-1 for unlabelled data), made by
the default collate from the per-sample ``(list[Tensor], int)``. Validation batches are
``(images [B, 3, C, C], labels [B])`` with the evaluation transform.

The training loader deals one seeded permutation per epoch to the ranks and accumulation steps
itself (a ``DistributedSampler``, which Lightning leaves in place), one whole global batch per
optimizer step, and is resumable mid-epoch, also with another split of the same global batch (see
:mod:`xcit_ssl.data.resumable`); evaluation loaders are ordered. ``batch_size`` is per device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xcit_ssl.data.datasets import DatasetKind, open_dataset, subset
from xcit_ssl.data.resumable import default_sampler, resumable_loader
from xcit_ssl.data.transforms import MultiCropTransform, build_eval_transform
from xcit_ssl.data.workers import worker_init
from xcit_ssl.errors import UserError

log = logging.getLogger(__name__)


class ImageDataModule(L.LightningDataModule):
    """Images for self-supervised pretraining and the labelled sets its evaluation needs.

    Args:
        root: data folder (ImageNet layout for ``imagefolder``, any tree of images for ``flat``);
            for ``fashion_mnist`` a folder of the four IDX files, default the installed copy.
        dataset: ``imagefolder`` (``root/<split>/<class>/*``), ``flat`` (every image under
            ``root``, unlabelled, no validation), ``fashion_mnist``, or shards written by
            ``xcit-ssl shard``: ``webdataset`` (``root/<split>/*.tar``) or ``litdata``
            (``root/<split>/``, local or a remote URL litdata reads).
        train_split: training sub-folder (imagefolder) / ``train`` (fashion_mnist).
        val_split: labelled validation split, or None for none. A missing val folder of an
            imagefolder data set only disables validation (with a warning); for fashion_mnist
            any of ``val``/``test``/``t10k`` means the 10000-image t10k set.
        train_transform: the multi-crop views; default DINO's ImageNet recipe (2x224 + 8x96).
        val_resize_size: evaluation transform: resize of the shorter side; default
            ``val_crop_size * 256 / 224`` (DINO's 256 -> 224 ratio).
        val_crop_size: evaluation transform: center crop; default the global crop size of
            ``train_transform`` (224 for DINO). Fashion-MNIST padded to 32: set both to 32.
        batch_size: training images per device and step.
        val_batch_size: evaluation images per device and step; default ``batch_size``.
        num_workers: DataLoader worker processes per device (multi-crop costs ~20-50 ms of CPU
            per image, so give it as many cores as the host has per GPU).
        pin_memory: page-locked host buffers (only used when CUDA is available).
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        drop_last: drop the last incomplete training batch (keeps per-step batch statistics
            and the DINO center update on full batches).
        limit_train_samples: train on a stratified subset of this many images (quick runs).
        limit_val_samples: validate on a stratified subset of this many images.
        pad_to: Fashion-MNIST only: zero-pad the 28-px images to this size (32 for patch 8/16).
        subset_seed: seed choosing the ``limit_*`` subsets.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: DatasetKind = "imagefolder",
        train_split: str = "train",
        val_split: str | None = "val",
        train_transform: MultiCropTransform | None = None,
        val_resize_size: int | None = None,
        val_crop_size: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        limit_train_samples: int | None = None,
        limit_val_samples: int | None = None,
        pad_to: int | None = None,
        subset_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise UserError(f"batch_size={batch_size}, val_batch_size={val_batch_size}: use positive sizes.")
        if num_workers < 0:
            raise UserError(f"num_workers={num_workers}: use 0 (load in the main process) or more.")
        if pad_to is not None and dataset != "fashion_mnist":
            # the fmnist recipes set it: name the flag that undoes it when they are pointed at other images
            raise UserError(f"data.pad_to={pad_to} pads Fashion-MNIST's 28 px images only (dataset '{dataset}' "
                            "given): pass --data.pad_to null")
        self.root = root
        self.dataset = dataset
        self.train_split = train_split
        self.val_split = val_split
        self.train_transform = train_transform if train_transform is not None else MultiCropTransform()
        # Evaluation normalises like training, so features of a model see the statistics it was
        # trained with.
        crop = val_crop_size or self.train_transform.global_crop_size
        resize = val_resize_size or round(crop * 256 / 224)
        self.val_transform = build_eval_transform(
            resize, crop, mean=self.train_transform.mean, std=self.train_transform.std
        )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.limit_train_samples = limit_train_samples
        self.limit_val_samples = limit_val_samples
        self.pad_to = pad_to
        self.subset_seed = subset_seed
        self._train: Dataset | None = None  # full training split, no transform
        self._val: Dataset | None = None
        self._val_checked = False
        self._device_augment: Any = None

    # ---- datasets -------------------------------------------------------------------------

    def _train_base(self) -> Dataset:
        if self._train is None:
            split = None if self.dataset == "flat" else self.train_split
            self._train = open_dataset(self.dataset, self.root, split, pad_to=self.pad_to)
        return self._train

    def _val_base(self) -> Dataset | None:
        if not self._val_checked:
            self._val_checked = True
            self._val = self._open_val()
        return self._val

    def _open_val(self) -> Dataset | None:
        if self.val_split is None or self.dataset == "flat":
            return None
        if self.dataset == "imagefolder":
            # Training first: it validates root, and validation labels use its class indices.
            classes = self._train_base().classes  # type: ignore[attr-defined]
            folder = Path(self.root or "") / self.val_split
            if not folder.is_dir():
                log.warning("No validation folder %s: validation is skipped.", folder)
                return None
            return open_dataset("imagefolder", self.root, self.val_split, classes=classes)
        if self.dataset in ("webdataset", "litdata") and not (Path(self.root or "") / self.val_split).is_dir():
            log.warning("No validation shards in %s: validation is skipped.", Path(self.root or "") / self.val_split)
            return None
        return open_dataset(self.dataset, self.root, self.val_split, pad_to=self.pad_to)

    def setup(self, stage: str | None = None) -> None:
        """Open (and validate) the folders now, so a bad path stops the run before training."""
        train = self._train_base()
        if stage in (None, "fit", "validate"):
            self._val_base()
        n = self.num_train_samples
        world, accumulate = self._split()
        streams = world * accumulate  # micro-batches of one optimizer step
        if self.drop_last and -(-n // streams) < self.batch_size and stage in (None, "fit"):
            per = "per device" if accumulate == 1 else "per device and accumulation step"
            raise UserError(
                f"The training set has {n} images, {-(-n // streams)} {per}, fewer than "
                f"batch_size={self.batch_size} with drop_last: no step would run. Lower "
                "--data.batch_size or add images."
            )
        log.info("Training on %d images from %s.", n, getattr(train, "root", self.root))

    def train_dataset(self) -> Dataset:
        """The training split (``limit_train_samples`` applied) with the multi-crop transform."""
        base = self._train_base()
        if self.limit_train_samples is not None:
            base = subset(base, self.limit_train_samples, self.subset_seed)
        return base.with_transform(self.train_transform)  # type: ignore[attr-defined]

    def eval_dataset(self, split: Literal["train", "val"], limit: int | None = None, seed: int = 0) -> Dataset | None:
        """A labelled split with the evaluation transform, e.g. the bank and queries of online k-NN.

        ``limit`` takes a class-stratified subset (chosen by ``seed``). None when that split has
        no labelled data (flat folders, no validation folder).
        """
        base = self._train_base() if split == "train" else self._val_base()
        if base is None or self.num_classes is None:
            return None
        if limit is not None:
            base = subset(base, limit, seed)
        return base.with_transform(self.val_transform)  # type: ignore[attr-defined]

    @property
    def num_train_samples(self) -> int:
        """Images per training epoch over all devices (before the per-device split)."""
        size = len(self._train_base())  # type: ignore[arg-type]
        return size if self.limit_train_samples is None else min(size, self.limit_train_samples)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the labelled data; None for unlabelled (flat) data."""
        classes = getattr(self._train_base(), "classes", [])
        return len(classes) or None

    @property
    def num_skipped_images(self) -> int:
        """Unreadable images replaced so far (training and validation, all worker processes)."""
        datasets = [self._train, self._val]
        return sum(int(getattr(d, "num_skipped", 0)) for d in datasets if d is not None)

    # ---- loaders --------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            drop_last=drop_last,
            worker_init_fn=worker_init if workers > 0 else None,  # pre-emption is the training process's
        )

    def _split(self) -> tuple[int, int]:
        """(processes, micro-batches per optimizer step) of the trainer, (1, 1) without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 1
        return int(trainer.world_size), int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def train_sampler(self, dataset: Dataset) -> DistributedSampler:
        """This process's share of one seeded permutation per epoch (the whole set on one device)."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        return default_sampler(dataset, world, rank)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        """A resumable loader: order and augmentation draws are restored from a mid-epoch checkpoint."""
        dataset = self.train_dataset()
        workers = self.num_workers
        return resumable_loader(  # type: ignore[return-value]
            dataset,
            self.train_sampler(dataset),
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last,
            start_epoch=self.trainer.current_epoch if self.trainer is not None else 0,
            accumulate=self._split()[1],  # the micro-batches of a step are dealt from one global batch
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of ``photometric='device'`` views get their photometric augmentation here,
        batched on the device that trains (the CPU workers only decoded, cropped and flipped)."""
        transform = self.train_transform
        trainer = self.trainer
        if getattr(transform, "photometric", "per_image") != "device" or trainer is None or not trainer.training:
            return batch
        views, labels = batch
        if self._device_augment is None:
            from xcit_ssl.data.gpu_augment import device_augmentations

            self._device_augment = device_augmentations(transform)
        self._device_augment.to(views[0].device)
        from xcit_ssl.data.gpu_augment import augment_views

        return [augment_views(list(views), self._device_augment), labels]

    def val_dataloader(self) -> DataLoader | list:
        """Labelled validation images with the evaluation transform; ``[]`` (no validation) if none."""
        dataset = self.eval_dataset("val", self.limit_val_samples, self.subset_seed)
        if dataset is None:
            return []
        return self._loader(dataset, self.val_batch_size, shuffle=False, drop_last=False)

    def teardown(self, stage: str | None = None) -> None:
        skipped = self.num_skipped_images
        if skipped:
            log.warning(
                "%d unreadable images were replaced by neighbours during %s (paths logged above).",
                skipped, stage or "this run",
            )  # fmt: skip
