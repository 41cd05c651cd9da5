"""Typed evaluation protocols (the YAML files in the top-level ``eval/`` folder) and their lookup.

A protocol fixes everything that defines a reported number: the dataset and splits, the feature
transform, and the k-NN or linear-probe hyperparameters. The commands take one by name
(``--protocol knn_imagenet``) or by path, and any value can still be overridden by a flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..data.datasets import DatasetKind  # flat (unlabelled) is refused by eval_data.check_classes
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform

# evaluation needs labels: no "flat" folders of unlabelled images


@dataclass
class DataConfig:
    """Which images: ``dataset`` kind, ``root`` folder, the two splits, optional stratified subsets.

    ``pad_to`` (Fashion-MNIST only) zero-pads the 28 px images to this size in the dataset, as the
    demo recipe trains on them.
    """

    dataset: DatasetKind = "imagefolder"
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    n_train: int = 0  # 0 = the whole split; otherwise a stratified subset of this size
    n_val: int = 0
    seed: int = 0  # fixes the subsets
    pad_to: Optional[int] = None


@dataclass
class FeatureConfig:
    """The eval transform: resize the shorter side, center crop, normalise.

    ``mean``/``std`` null means: take them from the checkpoint's metadata (the values it was
    trained with), else ImageNet's.
    """

    resize_size: int = 256
    crop_size: int = 224
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    #: which tokens make the feature: the normalised CLS (DINO's protocol); CLS concatenated with the
    #: mean of the last block's patch tokens ([B, 2D]); or CLS + a two-level spatial pyramid of the
    #: patch-token grid (its mean and its 4 quadrant means, [B, 6D]); or a three-level one (the same
    #: and its 4 x 4 average pool, [B, 22D]: needs a 4 x 4 grid). Applies to every method alike.
    pooling: Literal["cls", "cls+mean_patch", "cls+pyramid", "cls+pyramid3"] = "cls"
    mean: Optional[list[float]] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Optional[list[float]] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class KNNConfig:
    """Weighted k-NN: all ``ks`` from one search; votes weigh exp(sim / temperature)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    backend: Literal["auto", "faiss", "torch"] = "auto"


@dataclass
class LinearConfig:
    """Linear probe (DINO): SGD momentum 0.9, lr = base_lr x batch_size / 256, cosine to 0.

    ``batch_size`` is the global batch. ``fast`` trains on cached eval features instead (no
    augmentation; not the protocol, reported as ``linear_fast``); with ``lr_sweep`` it first picks
    its base lr on a held-out part of the training features. Either way the reported number is the
    last epoch's, and a ``batch_size`` that leaves fewer than 10 steps per epoch is warned about.
    """

    epochs: int = 100
    batch_size: int = 1024
    base_lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    train_interpolation: Literal["bicubic", "bilinear"] = "bilinear"
    val_every_n_epochs: int = 1
    fast: bool = False
    #: fast probe only: base lrs to choose from on a held-out ``sweep_holdout`` fraction of the
    #: training images (never the test images); empty: train with ``base_lr``
    lr_sweep: list[float] = field(default_factory=list)
    sweep_holdout: float = 0.1


def build_feature_transform(
    resize_size: int,
    crop_size: int,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    interpolation: Literal["bicubic", "bilinear"] = "bicubic",
) -> Any:
    """PIL image -> float ``[3, crop, crop]`` (the data module's eval transform, typed lists accepted)."""
    return build_eval_transform(resize_size, crop_size, tuple(mean), tuple(std), interpolation)  # type: ignore[arg-type]


def transform_description(cfg: FeatureConfig, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What defines the features besides the weights and the images (part of the cache key)."""
    return {
        "resize_size": cfg.resize_size, "crop_size": cfg.crop_size, "interpolation": cfg.interpolation,
        "mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std],
        "pooling": getattr(cfg, "pooling", "cls"),
    }  # fmt: skip
