"""Datasets on real files: ImageNet layout, flat folders, Fashion-MNIST IDX, corrupt images, subsets."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets.mnist import read_image_file, read_label_file

from xcit_ssl.data.datasets import (
    FASHION_MNIST_ROOT,
    FashionMNIST,
    FlatImageDataset,
    ImageFolderDataset,
    LabelledSubset,
    open_dataset,
    read_idx,
    subset,
)
from xcit_ssl.errors import UserError


def _collate_labels(batch: list) -> list[int]:
    return [label for _, label in batch]


# ---- ImageNet layout ---------------------------------------------------------------------------


def test_imagefolder_sorted_classes_and_labels(
    imagenet_tree: Path, fmnist_train: FashionMNIST, layout: SimpleNamespace
) -> None:
    ds = ImageFolderDataset(imagenet_tree, "train")
    names = sorted(layout.folders.values())
    assert ds.classes == names == ["ankle_boot", "sneaker", "tshirt"]
    assert len(ds) == len(layout.folders) * layout.train_per_class  # README.txt and .cache/ are ignored
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (28, 28)
        assert label == int(ds.targets[i])
        assert Path(ds.path(i)).parent.name == names[label]
    # A PNG is lossless: its pixels are the Fashion-MNIST image it was written from.
    first_png = next(i for i in range(len(ds)) if ds.path(i).endswith("img_00.png") and ds.targets[i] == 0)
    source = fmnist_train.images[np.flatnonzero(fmnist_train.targets == 9)[0]]  # ankle_boot = label 9
    pixels = np.asarray(ds[first_png][0])
    assert np.array_equal(pixels[..., 0], source) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_imagefolder_val_indexes_against_training_classes(
    imagenet_tree: Path, tmp_path: Path, layout: SimpleNamespace
) -> None:
    train = ImageFolderDataset(imagenet_tree, "train")
    # A validation split that lacks the first class must still use the training indices.
    val_root = tmp_path / "root"
    shutil.copytree(imagenet_tree / "val" / "tshirt", val_root / "val" / "tshirt")
    val = ImageFolderDataset(val_root, "val", classes=train.classes)
    assert val.classes == train.classes
    assert set(val.targets.tolist()) == {train.classes.index("tshirt")} == {2}
    assert len(val) == layout.val_per_class
    # ...and a class unknown to training is refused.
    (val_root / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(val_root / "val" / "zebra" / "z.png")
    with pytest.raises(UserError, match="zebra"):
        ImageFolderDataset(val_root, "val", classes=train.classes)


def test_flat_folder_recursive_unlabelled(imagenet_tree: Path, layout: SimpleNamespace) -> None:
    ds = FlatImageDataset(imagenet_tree / "train")
    assert len(ds) == len(layout.folders) * layout.train_per_class
    assert ds.classes == [] and set(ds.targets.tolist()) == {-1}
    image, label = ds[3]
    assert label == -1 and image.mode == "RGB"
    whole = open_dataset("flat", imagenet_tree, None)
    assert len(whole) == len(layout.folders) * (layout.train_per_class + layout.val_per_class)


@pytest.mark.parametrize(
    ("layout", "message"),
    [("missing", "does not exist"), ("no_classes", "no class sub-folders"), ("no_images", "No images")],
)
def test_imagefolder_bad_folders_name_the_path(tmp_path: Path, layout: str, message: str) -> None:
    split = tmp_path / "train"
    if layout == "no_classes":
        split.mkdir()
        Image.new("RGB", (8, 8)).save(split / "loose.png")  # images but no class folders
    elif layout == "no_images":
        (split / "cat").mkdir(parents=True)
        (split / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=message) as info:
        open_dataset("imagefolder", tmp_path, "train")
    assert str(split) in str(info.value)


def test_flat_and_root_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=str(tmp_path)):
        FlatImageDataset(tmp_path)  # empty
    with pytest.raises(UserError, match="does not exist"):
        FlatImageDataset(tmp_path / "nope")
    with pytest.raises(UserError, match="--data.root"):
        open_dataset("imagefolder", None, "train")
    with pytest.raises(UserError, match="pads Fashion-MNIST.s 28 px images only .* pass --data.pad_to null"):
        open_dataset("imagefolder", tmp_path, "train", pad_to=32)


# ---- corrupt images ----------------------------------------------------------------------------


def test_corrupt_images_are_skipped_counted_and_logged(
    corrupt_tree: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture, layout: SimpleNamespace
) -> None:
    root, broken = corrupt_tree
    ds = ImageFolderDataset(root, "train")
    assert len(ds) == len(layout.folders) * layout.train_per_class + len(broken)
    bad = [i for i in range(len(ds)) if Path(ds.path(i)) in broken]
    assert len(bad) == 2
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.data.images"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2
    for path in broken:
        assert any(str(path) in r.getMessage() for r in caplog.records)
    for i in bad:
        # The substitute is the next file, a readable image of the same class folder.
        image, label = items[i]
        expected, expected_label = ds[i + 1]
        assert label == expected_label and np.array_equal(np.asarray(image), np.asarray(expected))
    # A copy made by with_transform shares the record: the same file is neither counted nor logged again.
    ds.with_transform(None)[bad[0]]
    assert ds.num_skipped == 2


def test_skip_count_reaches_main_process_from_workers(corrupt_tree: tuple[Path, list[Path]]) -> None:
    root, broken = corrupt_tree
    ds = ImageFolderDataset(root, "train")
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_collate_labels)
    labels = [label for batch in loader for label in batch]
    assert len(labels) == len(ds)
    assert ds.num_skipped == len(broken)


def test_all_unreadable_stops_with_message(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{k}.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(UserError, match="could not be decoded"):
        ds[0]


# ---- Fashion-MNIST -----------------------------------------------------------------------------


def test_fashion_mnist_known_facts(fmnist_train: FashionMNIST) -> None:
    test = FashionMNIST(train=False)
    assert (len(fmnist_train), len(test)) == (60000, 10000)
    assert len(fmnist_train.classes) == 10 and fmnist_train.classes[9] == "Ankle boot"
    assert np.array_equal(np.bincount(fmnist_train.targets), np.full(10, 6000))
    assert np.array_equal(np.bincount(test.targets), np.full(10, 1000))
    image, label = fmnist_train[0]
    assert label == 9 and fmnist_train.classes[label] == "Ankle boot"
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 2]) and pixels.max() > 200


def test_fashion_mnist_matches_torchvision_reader(tmp_path: Path) -> None:
    # Independent reference: torchvision's own IDX reader on the decompressed t10k files, which
    # also exercises our plain (non-gz) path.
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(Path(FASHION_MNIST_ROOT) / f"{name}.gz") as src:
            (tmp_path / name).write_bytes(src.read())
    ours = FashionMNIST(tmp_path, train=False)
    assert np.array_equal(ours.images, read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")).numpy())
    assert np.array_equal(ours.targets, read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")).numpy())


def test_fashion_mnist_pad_to(fmnist_train: FashionMNIST) -> None:
    padded = FashionMNIST(train=False, pad_to=32)
    plain = FashionMNIST(train=False)
    image = np.asarray(padded[5][0])[..., 0]
    assert image.shape == (32, 32)
    assert np.array_equal(image[2:30, 2:30], plain.images[5])
    assert image[:2].sum() == image[30:].sum() == image[:, :2].sum() == image[:, 30:].sum() == 0
    with pytest.raises(UserError, match="smaller"):
        FashionMNIST(train=False, pad_to=20)


def test_fashion_mnist_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist") as info:
        FashionMNIST(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes((2049).to_bytes(4, "big") + bytes(8))  # label magic
    with pytest.raises(UserError, match="magic"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte", ndim=3)
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    (tmp_path / "short").write_bytes(header + bytes(100))
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "short", ndim=3)


def test_open_dataset_fashion_mnist_splits() -> None:
    assert len(open_dataset("fashion_mnist", None, "val")) == 10000
    with pytest.raises(UserError, match="split"):
        open_dataset("fashion_mnist", None, "holdout")


# ---- subsets -----------------------------------------------------------------------------------


def test_subset_is_stratified_exact_and_seeded(fmnist_train: FashionMNIST) -> None:
    small = subset(fmnist_train, 105, seed=1)
    assert isinstance(small, LabelledSubset) and len(small) == 105
    counts = np.bincount(small.targets, minlength=10)
    assert counts.sum() == 105 and counts.min() == 10 and counts.max() == 11
    assert np.array_equal(small.targets, fmnist_train.targets[small.indices])
    assert small.classes == fmnist_train.classes
    assert subset(fmnist_train, 105, seed=1).indices == small.indices
    assert subset(fmnist_train, 105, seed=2).indices != small.indices
    assert subset(fmnist_train, 60000) is fmnist_train


def test_subset_follows_unbalanced_class_sizes(imagenet_tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    shutil.copytree(imagenet_tree / "train", root)
    for extra in range(12):  # sneaker: 6 -> 18 images, others stay at 6
        shutil.copy(root / "sneaker" / "img_00.png", root / "sneaker" / f"extra_{extra}.png")
    ds = ImageFolderDataset(root)
    part = subset(ds, 15, seed=0)
    assert np.array_equal(np.bincount(part.targets), [3, 9, 3])  # proportional to 6:18:6
    unlabelled = subset(FlatImageDataset(root), 7, seed=0)
    assert len(unlabelled) == 7 and len(set(unlabelled.indices)) == 7
    image, _ = part.with_transform(lambda im: torch.zeros(1))[0]
    assert torch.equal(image, torch.zeros(1))


@pytest.mark.slow  # ~8 s: each spawned worker re-imports torch
def test_skip_count_reaches_main_process_from_spawned_workers(corrupt_tree: tuple[Path, list[Path]]) -> None:
    # Spawned workers (the default on macOS, and what CUDA users switch to) get a pickled copy of
    # the dataset; the counter must still be shared, not copied.
    root, broken = corrupt_tree
    ds = ImageFolderDataset(root, "train")
    loader = DataLoader(ds, batch_size=8, num_workers=1, collate_fn=_collate_labels, multiprocessing_context="spawn")
    assert len([label for batch in loader for label in batch]) == len(ds)
    assert ds.num_skipped == len(broken)
