"""Data for supervised and distilled training (REFERENCE.md section 4, DeiT/XCiT recipe).

- :class:`SupervisedTrainTransform`: timm's training pipeline (RandomResizedCrop, flip,
  RandAugment ``rand-m9-mstd0.5-inc1``, bicubic, random erasing 0.25).
- :func:`build_supervised_eval_transform`: resize to ``img_size / crop_pct`` then center crop
  ``img_size``; XCiT reports its numbers with crop ratio 1.0.
- :class:`RepeatAugSampler`: repeated augmentation (each image ``num_repeats`` times per batch
  stream, the copies spread over the ranks), DDP-aware.
- :class:`SupervisedDataModule`: labelled ImageNet-layout folders or Fashion-MNIST.

Batches are ``(images [B, 3, S, S] float, labels [B] int64)``; mixup/CutMix happens on the batch
in the LightningModule, not here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sized
from typing import Literal

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.datasets import DatasetKind
from xcit_ssl.data.resumable import epoch_permutation
from xcit_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from xcit_ssl.errors import UserError

log = logging.getLogger(__name__)

DEIT_RANDAUGMENT = "rand-m9-mstd0.5-inc1"


class SupervisedTrainTransform:
    """timm's ``create_transform`` training pipeline with the DeiT/XCiT defaults.

    Maps an RGB PIL image to a normalised float tensor ``[3, img_size, img_size]``.

    Args:
        img_size: training crop size (224; 384 for the fine-tune recipes).
        scale: RandomResizedCrop area range (ImageNet: (0.08, 1)).
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal-flip probability.
        auto_augment: timm RandAugment / AutoAugment policy string, or None for none
            (XCiT: ``rand-m9-mstd0.5-inc1``: 2 ops, magnitude 9 with std 0.5, increasing ops).
        color_jitter: colour-jitter strength; timm ignores it while ``auto_augment`` is set.
        interpolation: resampling of the crop (XCiT: bicubic).
        re_prob: random-erasing probability (XCiT: 0.25), applied after normalisation.
        re_mode: erased-area fill: ``pixel`` (per-pixel normal noise, XCiT), ``rand`` or ``const``.
        re_count: erased rectangles per image.
        mean, std: normalisation (ImageNet's).
    """

    def __init__(
        self,
        img_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: float = 0.5,
        auto_augment: str | None = DEIT_RANDAUGMENT,
        color_jitter: float = 0.4,
        interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic",
        re_prob: float = 0.25,
        re_mode: Literal["pixel", "rand", "const"] = "pixel",
        re_count: int = 1,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        from timm.data import create_transform  # heavy import, only when a transform is built

        if img_size < 1:
            raise UserError(f"train_transform.img_size={img_size}: use a positive size (224, or 32 for Fashion-MNIST)")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise UserError(f"train_transform.scale={scale}: use 0 < min <= max <= 1, e.g. [0.08, 1.0]")
        if not 0.0 <= re_prob <= 1.0 or not 0.0 <= hflip <= 1.0:
            raise UserError(f"train_transform: re_prob={re_prob} and hflip={hflip} are probabilities in [0, 1]")
        self.img_size = int(img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.auto_augment = auto_augment
        try:
            self.transform = create_transform(
                self.img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                color_jitter=color_jitter, auto_augment=auto_augment, interpolation=interpolation,
                mean=self.mean, std=self.std, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
            )  # fmt: skip
        except (AssertionError, ValueError, KeyError) as err:
            raise UserError(
                f"train_transform: timm rejected the augmentation settings ({err}); check auto_augment "
                f"(e.g. '{DEIT_RANDAUGMENT}') and re_mode"
            ) from None

        _patch_posterize(self.transform)

    def __call__(self, image: Image.Image) -> Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, also for 0 bits: Pillow >= 11 refuses ``bits=0``, older Pillow (with
    which the RandAugment policies were tuned) returned a black image; we keep that behaviour."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: object) -> None:
    """Point the posterize ops of timm's RandAugment (inside ``transform``) at :func:`_posterize`.

    With ``rand-m9-mstd0.5`` the magnitude reaches its maximum 10 in ~2 % of draws, where
    ``PosterizeIncreasing`` keeps 0 bits and would crash the DataLoader under Pillow >= 11.
    """
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: ``floor(img_size / crop_pct)`` (DeiT/timm rule)."""
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"crop_pct={crop_pct}: use a crop ratio in (0, 1] (XCiT: 1.0, DeiT/DINO: 0.875)")
    return int(math.floor(img_size / crop_pct + 1e-9))


def build_supervised_eval_transform(
    img_size: int = 224,
    crop_pct: float = 1.0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: Literal["bicubic", "bilinear"] = "bicubic",
) -> torch.nn.Module:
    """Resize the shorter side to ``floor(img_size / crop_pct)``, center crop ``img_size``, normalise.

    PIL image -> float ``[3, img_size, img_size]``. ``crop_pct=1.0`` (XCiT's "full crop") resizes
    straight to the crop size; 0.875 is the classic 256 -> 224.
    """
    resize = eval_resize_size(img_size, crop_pct)
    return build_eval_transform(resize, img_size, tuple(mean), tuple(std), interpolation)  # type: ignore[arg-type]


class RepeatAugSampler(DistributedSampler):
    """Repeated augmentation (Hoffer et al.; DeiT ``RASampler``), our implementation.

    Each epoch draws one permutation (seeded by ``seed + epoch``, identical on every rank),
    repeats every index ``num_repeats`` times in a row, pads the list to a multiple of the world
    size and deals it round-robin: rank ``r`` takes positions ``r, r + R, r + 2R, ...``. With
    ``R >= num_repeats`` the copies of an image land on different ranks, each augmented
    differently.

    Epoch length. ``full_epoch=False`` (DeiT): each rank yields ``ceil(N / R)`` samples, as many
    as a plain DistributedSampler, so an epoch costs the same compute and sees the first
    ``~N / num_repeats`` images of the permutation ``num_repeats`` times each; the permutation
    changes every epoch. ``full_epoch=True``: every image ``num_repeats`` times per epoch (an
    epoch ``num_repeats`` times longer).

    It is a ``DistributedSampler`` subclass, so Lightning leaves it in place under DDP instead of
    wrapping it, and calls ``set_epoch`` on it every epoch.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        num_repeats: int = 3,
        full_epoch: bool = False,
    ) -> None:
        if num_repeats < 1:
            raise UserError(f"repeated augmentation needs num_repeats >= 1, got {num_repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        n = len(dataset)
        if n == 0:
            raise UserError("repeated augmentation over an empty data set: check --data.root")
        self.num_repeats = num_repeats
        self.full_epoch = full_epoch
        self.num_samples = math.ceil(n * num_repeats / num_replicas)  # available per rank
        self.total_size = self.num_samples * num_replicas
        self.num_selected = self.num_samples if full_epoch else math.ceil(n / num_replicas)

    def global_order(self, epoch: int, multiple: int) -> Tensor:
        """The epoch's repeated order over all ranks, ``multiple`` positions at a time: the
        permutation with each index ``num_repeats`` times in a row, wrapped around as far as needed,
        cut to a multiple of ``multiple`` that covers the epoch (``N``, or ``N x num_repeats`` for a
        full epoch). With ``multiple`` = world size, rank ``r`` takes positions ``r::world``; the
        resumable loader deals it to ranks and accumulation steps the same way
        (:class:`~xcit_ssl.data.resumable.EpochTaggedSampler`)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        order = epoch_permutation(n, self.shuffle, self.seed, epoch)
        repeated = order.repeat_interleave(self.num_repeats)
        wanted = n * self.num_repeats if self.full_epoch else n
        total = -(-wanted // multiple) * multiple
        if total > len(repeated):  # pad by wrapping around, as DistributedSampler does
            repeated = repeated.repeat(-(-total // len(repeated)))
        return repeated[:total]

    def __iter__(self) -> Iterator[int]:
        order = self.global_order(self.epoch, self.num_replicas)
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_selected


class SupervisedDataModule(ImageDataModule):
    """Labelled images for supervised / distilled training and top-1/top-5 validation.

    Args:
        root: ImageNet-layout folder (``root/<split>/<class>/*``); for ``fashion_mnist`` the folder
            of the IDX files (default: the installed copy).
        dataset: ``imagefolder`` or ``fashion_mnist`` (labels are required).
        train_split, val_split: sub-folders (fashion_mnist: ``train`` and ``val``/``test``).
        train_transform: the training augmentation (default: the XCiT recipe at 224 px).
        val_crop_pct: crop ratio of the validation transform (XCiT: 1.0; resize
            ``floor(img_size / crop_pct)``, crop ``img_size``).
        val_img_size: validation crop size; default the training ``img_size``.
        repeated_aug: repeated-augmentation factor (XCiT: 3); 1 turns it off.
        repeated_aug_full_epoch: see :class:`RepeatAugSampler` (False: DeiT's epoch length).
        batch_size: training images per device and step (even when mixup/CutMix is on).
        other arguments: as :class:`~xcit_ssl.data.datamodule.ImageDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: DatasetKind = "imagefolder",
        train_split: str = "train",
        val_split: str | None = "val",
        train_transform: SupervisedTrainTransform | None = None,
        val_crop_pct: float = 1.0,
        val_img_size: int | None = None,
        repeated_aug: int = 3,
        repeated_aug_full_epoch: bool = False,
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
        if dataset == "flat":
            raise UserError(
                "supervised training needs labels: data.dataset 'flat' has none. Use an ImageNet-layout "
                "folder (--data.dataset imagefolder) or fashion_mnist"
            )
        if repeated_aug < 1:
            raise UserError(f"data.repeated_aug={repeated_aug}: use 1 (off) or more (XCiT: 3)")
        transform = train_transform if train_transform is not None else SupervisedTrainTransform()
        crop = val_img_size or transform.img_size
        super().__init__(
            root=root, dataset=dataset, train_split=train_split, val_split=val_split,
            train_transform=transform,  # type: ignore[arg-type]
            val_resize_size=eval_resize_size(crop, val_crop_pct), val_crop_size=crop, batch_size=batch_size,
            val_batch_size=val_batch_size, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=persistent_workers, drop_last=drop_last, limit_train_samples=limit_train_samples,
            limit_val_samples=limit_val_samples, pad_to=pad_to, subset_seed=subset_seed,
        )  # fmt: skip
        self.val_crop_pct = val_crop_pct
        self.repeated_aug = repeated_aug
        self.repeated_aug_full_epoch = repeated_aug_full_epoch

    def train_sampler(self, dataset: Dataset) -> DistributedSampler:
        """This process's sampler: repeated augmentation when ``repeated_aug > 1``, else one seeded
        permutation per epoch sharded over the ranks (the resumable loader tags it with the epoch)."""
        if self.repeated_aug <= 1:
            return super().train_sampler(dataset)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        # the same seed on every rank (one shared permutation); Lightning's samplers use it too
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return RepeatAugSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,  # type: ignore[arg-type]
            num_repeats=self.repeated_aug, full_epoch=self.repeated_aug_full_epoch,
        )  # fmt: skip
