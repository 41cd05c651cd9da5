"""Datasets: ImageNet-layout folders, flat folders of unlabelled images, Fashion-MNIST; one entry
point, :func:`open_dataset`, for every kind (the shards live in :mod:`xcit_ssl.data.shards`).

Every dataset returns ``(transform(image), label)`` with ``image`` an RGB PIL image and ``label``
an int (-1 when unknown), and exposes ``classes``, ``targets`` (int64 numpy array),
``num_skipped`` and ``with_transform(t)`` (a shallow copy sharing the file index). The file list,
decoding and the skip-and-count policy for unreadable files live in :mod:`xcit_ssl.data.images`.
Missing or empty folders stop the run at start with a ``UserError`` naming the path and the fix in
the flags of the command that opened the folder (:class:`DataFlags`: ``fit``'s ``--data.root`` by
default, ``xcit-ssl shard``'s ``--root`` when it reads the folder to shard).

Fashion-MNIST padding. ``pad_to`` belongs to the dataset, not to the transforms: it is a fact of
this data set (28-px images on a black background, so zero padding is seamless) that turns the
images into a canvas a patch-8/16 model tiles exactly (32 px -> 4x4 patches of 8), and every
transform downstream (multi-crop, eval, linear probe) then sees the same canvas.
"""

from __future__ import annotations

import copy
import gzip
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch.utils.data
from PIL import Image
from torch.utils.data import Dataset

from xcit_ssl.data.images import IMAGE_EXTENSIONS, ImageFileDataset, is_image, scan_images, skipping_unreadable
from xcit_ssl.data.shards import open_shards
from xcit_ssl.errors import UserError

log = logging.getLogger(__name__)

#: Every data set kind, once (``--data.dataset``, protocols, ``open_dataset``): ``flat`` is
#: unlabelled, so evaluation rejects it with its own message (it needs labels).
DatasetKind = Literal["imagefolder", "flat", "fashion_mnist", "webdataset", "litdata"]
DATASET_KINDS: tuple[str, ...] = get_args(DatasetKind)
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class DataFlags:
    """How a message about an image folder names the fix: in the flags of the command that opened it.

    ``root``: the flag that gave the folder; ``flat``: what to pass to read a folder of unlabelled
    images; ``splits``: how to choose the split. The defaults are those of ``fit``, ``knn``, ``linear``
    (``--data.*``); ``xcit-ssl shard`` passes its own (:data:`xcit_ssl.data.shard_writer.SHARD_FLAGS`).
    """

    root: str = "--data.root"
    flat: str = "--data.dataset flat"
    splits: str = "pick the split with --data.train_split / --data.val_split"


DATA_FLAGS = DataFlags()


def _peek(path: Path, limit: int = 200) -> tuple[bool, bool]:
    """(holds a folder, holds an image) among the first ``limit`` entries of ``path`` (cheap on huge folders)."""
    folder = image = False
    with os.scandir(path) as entries:
        for _, entry in zip(range(limit), entries):
            if entry.name.startswith("."):
                continue
            folder = folder or entry.is_dir()
            image = image or (entry.is_file() and is_image(entry.name))
    return folder, image


def _missing_split_message(root: Path, folder: Path, split: str | None, flags: DataFlags = DATA_FLAGS) -> str:
    """Why ``folder`` (``root/split``) is not an ImageNet-layout split, in terms of what ``root`` holds."""
    layout = "<root>/<split>/<class>/<image>.JPEG (ImageNet layout)"
    if not root.is_dir():
        return f"Image folder {folder} does not exist, nor does {root}: point {flags.root} at a folder laid out as {layout}."
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    if any(e.is_file() and is_image(e.name) for e in entries):
        return (
            f"{root} holds images directly, not in {split}/<class>/ sub-folders: for unlabelled images "
            f"(DINO needs no labels) pass {flags.flat}; for labelled data lay it out as {layout}."
        )
    subfolders = [e.name for e in entries if e.is_dir()]
    names = f"{', '.join(subfolders[:4])}{', ...' if len(subfolders) > 4 else ''}"
    peeks = [_peek(root / name) for name in subfolders[:20]]
    if peeks and not any(folder for folder, _ in peeks) and any(image for _, image in peeks):
        return (
            f"{root} has no {split}/ folder; its sub-folders ({names}) hold images directly: "
            f"pass {flags.flat} to train on them unlabelled (DINO needs no labels), or move them into "
            f"{root / (split or 'train')}/<class>/ for the ImageNet layout."
        )
    found = f" (it holds {names})" if subfolders else ""
    return f"Image folder {folder} does not exist{found}: {flags.splits}, or lay the data out as {layout}."


class ImageFolderDataset(ImageFileDataset):
    """ImageNet layout ``root/<split>/<class>/<image>``: class names sorted -> indices 0..C-1.

    Args:
        root: data set folder.
        split: sub-folder (``"train"``, ``"val"``) or None to read ``root`` itself.
        transform: applied to the RGB PIL image.
        classes: the class list to index against (pass the training classes when reading a
            validation split so indices agree even if it lacks some classes); default: the
            sub-folders found here.
        flags: the flags its error messages name (:class:`DataFlags`; ``fit``'s by default).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | None = None,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        flags: DataFlags = DATA_FLAGS,
    ) -> None:
        folder = Path(root) / split if split else Path(root)
        if not folder.is_dir():
            raise UserError(_missing_split_message(Path(root), folder, split, flags))
        found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise UserError(
                f"{folder} has no class sub-folders. Expected <root>/<split>/<class>/<image>.JPEG; "
                f"for a folder of unlabelled images use {flags.flat}."
            )
        class_list = list(classes) if classes is not None else found
        index_of = {name: i for i, name in enumerate(class_list)}
        unknown = [name for name in found if name not in index_of]
        if unknown:
            raise UserError(
                f"{folder} has class folders not among the {len(class_list)} training classes, e.g. "
                f"{unknown[:3]}: the splits must share class names."
            )
        paths: list[str] = []
        labels: list[int] = []
        for name in found:
            files = scan_images(folder / name)
            if not files:
                log.warning("Class folder %s holds no images (%s).", folder / name, ", ".join(IMAGE_EXTENSIONS))
            paths += files
            labels += [index_of[name]] * len(files)
        if not paths:
            raise UserError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}: check {flags.root} "
                "and the split name."
            )
        self.root = folder
        super().__init__(paths, np.asarray(labels), class_list, transform)


class FlatImageDataset(ImageFileDataset):
    """Every image under ``root`` (recursively), unlabelled: label -1, no classes."""

    def __init__(
        self, root: str | os.PathLike[str], transform: Callable | None = None, flags: DataFlags = DATA_FLAGS
    ) -> None:
        folder = Path(root)
        if not folder.is_dir():
            raise UserError(f"Image folder {folder} does not exist: check {flags.root}.")
        paths = scan_images(folder)
        if not paths:
            raise UserError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}: check {flags.root}.")
        self.root = folder
        super().__init__(paths, np.full(len(paths), -1), [], transform)


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) holding uint8 data of ``ndim`` dims.

    Header: two zero bytes, dtype code 0x08 (uint8), number of dims, then big-endian int32 sizes.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise UserError(f"Cannot read IDX file {path} ({error}): reinstall the data set.") from error
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    expected = 0x0800 + ndim
    if magic != expected:
        raise UserError(
            f"{path} is not a uint8 IDX file with {ndim} dims (magic {magic:#010x}, expected "
            f"{expected:#010x}): reinstall the data set."
        )
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise UserError(
            f"{path} holds {len(data) - header} bytes of data, its header says {shape}: the file is "
            "truncated; reinstall the data set."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    # The Debian package and the original site ship .gz; torchvision unpacks into FashionMNIST/raw.
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"Fashion-MNIST file {root / (stem + '.gz')} (or {stem}) not found. Install the data set with "
        f"`apt-get install -y dataset-fashion-mnist` (it lands in {FASHION_MNIST_ROOT}) or point "
        "--data.root at a folder holding the four standard IDX files."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST (60000 train / 10000 t10k images, 28x28 grayscale, 10 classes).

    Returns ``(transform(image), label)``, ``image`` a PIL RGB image (the grey channel
    replicated), 28 px or ``pad_to`` px with the digit-like item centred on black.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
        train: bool = True,
        transform: Callable | None = None,
        pad_to: int | None = None,
    ) -> None:
        folder = Path(root)
        prefix = "train" if train else "t10k"
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise UserError(
                f"Fashion-MNIST in {folder}: {len(images)} {prefix} images but {len(labels)} labels; "
                "reinstall the data set."
            )
        if pad_to is not None:
            side = images.shape[-1]
            if pad_to < side:
                raise UserError(f"pad_to={pad_to} is smaller than the {side}-px Fashion-MNIST images.")
            before = (pad_to - side) // 2
            after = pad_to - side - before
            images = np.pad(images, ((0, 0), (before, after), (before, after)))
        self.root = folder
        self.images = images
        self.targets = labels.astype(np.int64)
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform
        self.num_skipped = 0  # decoded in memory: nothing can be unreadable

    def __len__(self) -> int:
        return len(self.images)

    def with_transform(self, transform: Callable | None) -> FashionMNIST:
        """A shallow copy with another transform, sharing the pixel arrays."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])


_TEST_SPLITS = ("val", "test", "t10k")


def open_dataset(
    kind: DatasetKind,
    root: str | os.PathLike[str] | None,
    split: str | None,
    transform: Callable | None = None,
    pad_to: int | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Open one split of a data set.

    ``imagefolder``: ``root/split/<class>/*``. ``flat``: every image under ``root/split`` (or
    ``root`` when split is None), label -1. ``fashion_mnist``: split ``train`` or one of
    ``val``/``test``/``t10k`` (the 10000-image test set); ``root`` defaults to the installed copy.
    ``pad_to`` is for Fashion-MNIST only; ``classes`` for imagefolder only.
    """
    if pad_to is not None and kind != "fashion_mnist":
        raise UserError(f"data.pad_to={pad_to} pads Fashion-MNIST's 28 px images only (dataset '{kind}' given): "
                        "pass --data.pad_to null")
    if kind == "fashion_mnist":
        if split not in ("train", *_TEST_SPLITS):
            raise UserError(f"Fashion-MNIST split {split!r} does not exist: use 'train' or 'val' (t10k).")
        return FashionMNIST(root or FASHION_MNIST_ROOT, train=split == "train", transform=transform, pad_to=pad_to)
    if root is None:
        raise UserError(f"Dataset '{kind}' needs a folder: pass --data.root /path/to/images.")
    if kind == "imagefolder":
        return ImageFolderDataset(root, split, transform=transform, classes=classes)
    if kind == "flat":
        return FlatImageDataset(Path(root) / split if split else root, transform=transform)
    if kind in ("webdataset", "litdata"):
        return open_shards(kind, root, split, transform=transform, classes=classes)
    raise UserError(f"Unknown dataset kind {kind!r}: use one of {', '.join(DATASET_KINDS)}.")


class LabelledSubset(torch.utils.data.Subset):
    """``Subset`` that keeps ``targets``, ``classes`` and ``num_skipped`` of its dataset."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        parent_targets = getattr(dataset, "targets", None)
        self.targets = None if parent_targets is None else np.asarray(parent_targets)[self.indices]
        self.classes = list(getattr(dataset, "classes", []))

    @property
    def num_skipped(self) -> int:
        return int(getattr(self.dataset, "num_skipped", 0))

    def with_transform(self, transform: Callable | None) -> LabelledSubset:
        return LabelledSubset(self.dataset.with_transform(transform), self.indices)  # type: ignore[attr-defined]

    def skipping_unreadable(self) -> LabelledSubset:
        return LabelledSubset(skipping_unreadable(self.dataset), self.indices)


def subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` samples of ``dataset``, stratified by class when it has labels (random otherwise).

    Class quotas are proportional to class sizes (largest remainder, so they sum to ``n``);
    which samples is decided by ``seed`` alone. Returns ``dataset`` itself when ``n >= len``.
    Indices come back sorted, which keeps file reads roughly in directory order.
    """
    size = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise UserError(f"A subset needs at least one sample, got n={n}.")
    if n >= size:
        return dataset
    rng = np.random.default_rng(seed)
    targets = getattr(dataset, "targets", None)
    labels = None if targets is None else np.asarray(targets)
    if labels is None or labels.min() < 0:
        return LabelledSubset(dataset, np.sort(rng.choice(size, n, replace=False)).tolist())
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / size
    quota = np.floor(exact).astype(np.int64)
    # Ties in the remainder are broken at random, not by class index.
    order = np.lexsort((rng.random(len(classes)), -(exact - quota)))
    quota[order[: n - quota.sum()]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota) if q > 0
    ]
    return LabelledSubset(dataset, np.sort(np.concatenate(chosen)).tolist())
