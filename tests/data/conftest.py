"""Real image files for the data tests: Fashion-MNIST images written as an ImageNet-layout tree."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from xcit_ssl.data.datasets import FashionMNIST

# Class folder names: the Fashion-MNIST classes with characters that are awkward in paths removed,
# and deliberately not in label order, so that "sorted names -> indices" is actually exercised.
FOLDERS = {9: "ankle_boot", 0: "tshirt", 7: "sneaker"}
TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 2


@pytest.fixture(scope="session")
def layout() -> SimpleNamespace:
    """Shape of the ``imagenet_tree``: ``folders`` {label: name}, images per class per split."""
    return SimpleNamespace(folders=FOLDERS, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS)


@pytest.fixture(scope="session")
def fmnist_train() -> FashionMNIST:
    return FashionMNIST(train=True)


def _write(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Mix formats like real data: PNG (lossless, so pixels can be compared) and JPEG.
    Image.fromarray(image).convert("RGB").save(path)


def _build_tree(root: Path, fmnist: FashionMNIST) -> Path:
    for label, folder in FOLDERS.items():
        indices = np.flatnonzero(fmnist.targets == label)[: TRAIN_PER_CLASS + VAL_PER_CLASS]
        for k, i in enumerate(indices[:TRAIN_PER_CLASS]):
            ext = "png" if k % 2 == 0 else "JPEG"
            _write(fmnist.images[i], root / "train" / folder / f"img_{k:02d}.{ext}")
        for k, i in enumerate(indices[TRAIN_PER_CLASS:]):
            _write(fmnist.images[i], root / "val" / folder / f"val_{k:02d}.png")
    (root / "train" / "README.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()
    _write(fmnist.images[0], root / "train" / ".cache" / "ignored.png")
    return root


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory, fmnist_train: FashionMNIST) -> Path:
    """``root/{train,val}/<class>/*`` with real Fashion-MNIST images, no corrupt files.

    train: 3 classes x 6 images (even k .png, odd k .JPEG), val: 3 x 2 .png; plus a README.txt
    and a hidden folder that must be ignored.
    """
    return _build_tree(tmp_path_factory.mktemp("imagenet"), fmnist_train)


@pytest.fixture(scope="session")
def corrupt_tree(tmp_path_factory: pytest.TempPathFactory, fmnist_train: FashionMNIST) -> tuple[Path, list[Path]]:
    """The same tree plus two broken train images: random bytes, and a truncated real JPEG."""
    root = _build_tree(tmp_path_factory.mktemp("imagenet_corrupt"), fmnist_train)
    garbage = root / "train" / "ankle_boot" / "img_02_garbage.JPEG"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    truncated = root / "train" / "tshirt" / "img_02_truncated.JPEG"
    truncated.write_bytes((root / "train" / "tshirt" / "img_01.JPEG").read_bytes()[:200])
    return root, [garbage, truncated]
