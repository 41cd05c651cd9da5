"""ImageDataModule end to end: config parsing, batches from real files, workers, errors, Lightning."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import jsonargparse
import lightning as L
import pytest
import torch
import yaml
from torchvision.transforms import v2

from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.transforms import MultiCropTransform
from xcit_ssl.errors import UserError


def _small_views(n_local: int = 2) -> MultiCropTransform:
    return MultiCropTransform(global_crop_size=32, local_crop_size=16, n_local_crops=n_local)


def test_yaml_with_nested_class_path_instantiates(imagenet_tree: Path) -> None:
    # What LightningCLI will do with a recipe's `data:` section.
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    recipe = {
        "data": {
            "root": str(imagenet_tree),
            "batch_size": 4,
            "num_workers": 0,
            "train_transform": {
                "class_path": "xcit_ssl.data.transforms.MultiCropTransform",
                "init_args": {"global_crop_size": 32, "local_crop_size": 16, "n_local_crops": 3,
                              "global_crop_scale": [0.3, 1.0]},
            },
        }
    }  # fmt: skip
    cfg = parser.parse_string(yaml.safe_dump(recipe))
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, ImageDataModule) and isinstance(dm.train_transform, MultiCropTransform)
    assert dm.train_transform.n_local_crops == 3 and dm.train_transform.global_crop_size == 32
    (crop,) = [s for s in dm.train_transform.global_view_1.transforms if isinstance(s, v2.RandomResizedCrop)]
    assert tuple(crop.scale) == (0.3, 1.0)
    assert dm.batch_size == 4
    # The dumped config round-trips (it is what gets saved into the run folder).
    again = parser.parse_string(parser.dump(cfg))
    assert again.data.train_transform.init_args.n_local_crops == 3
    # Dotted overrides reach the nested transform, and a misspelt key is refused.
    cfg = parser.parse_args(
        ["--data.train_transform=MultiCropTransform", "--data.train_transform.n_local_crops=5"]
    )
    assert cfg.data.train_transform.init_args.n_local_crops == 5
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_string(yaml.safe_dump({"data": {"batch_sise": 4}}))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder_batches_end_to_end(imagenet_tree: Path, layout: SimpleNamespace, num_workers: int) -> None:
    dm = ImageDataModule(
        root=str(imagenet_tree), train_transform=_small_views(), batch_size=4, num_workers=num_workers
    )
    dm.setup("fit")
    n_train = len(layout.folders) * layout.train_per_class
    assert dm.num_train_samples == n_train and dm.num_classes == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == n_train // 4  # drop_last
    views, labels = batches[0]
    assert isinstance(views, list) and len(views) == 4
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    seen = torch.cat([b[1] for b in batches])
    assert set(seen.tolist()) <= {0, 1, 2} and len(seen) == 16
    # Validation: labelled images through the eval transform (crop = global crop size).
    val = list(dm.val_dataloader())
    images = torch.cat([b[0] for b in val])
    val_labels = torch.cat([b[1] for b in val])
    assert images.shape == (len(layout.folders) * layout.val_per_class, 3, 32, 32)
    assert sorted(val_labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_workers_share_the_skip_count(
    corrupt_tree: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    root, broken = corrupt_tree
    dm = ImageDataModule(
        root=str(root), train_transform=_small_views(0), batch_size=4, num_workers=2, drop_last=False
    )
    dm.setup("fit")
    n = sum(len(b[1]) for b in dm.train_dataloader())
    assert n == dm.num_train_samples
    assert dm.num_skipped_images == len(broken)
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.data.datamodule"):
        dm.teardown("fit")
    assert f"{len(broken)} unreadable images" in caplog.text


def test_fashion_mnist_limits_padding_and_eval_sets() -> None:
    dm = ImageDataModule(
        dataset="fashion_mnist", pad_to=32, train_transform=_small_views(), val_crop_size=32,
        val_resize_size=32, batch_size=8, num_workers=0, limit_train_samples=40, limit_val_samples=20,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.num_train_samples == 40 and dm.num_classes == 10
    views, labels = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    images, val_labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32)
    assert len(dm.val_dataloader().dataset) == 20
    # Padding is visible in the eval images: the 2-px border is black (normalised zero).
    black = (0.0 - 0.485) / 0.229
    assert torch.allclose(images[:, 0, :2, :], torch.full_like(images[:, 0, :2, :], black), atol=1e-4)
    # Online k-NN sets: stratified subsets of train (bank) and t10k (queries), eval transform.
    bank = dm.eval_dataset("train", limit=50, seed=1)
    assert len(bank) == 50 and sorted(set(bank.targets.tolist())) == list(range(10))
    image, label = bank[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_flat_folder_has_no_labels_or_validation(imagenet_tree: Path) -> None:
    dm = ImageDataModule(root=str(imagenet_tree / "train"), dataset="flat", train_transform=_small_views(0),
                         batch_size=2, num_workers=0)  # fmt: skip
    dm.setup("fit")
    assert dm.num_classes is None and dm.val_dataloader() == []
    assert dm.eval_dataset("train") is None
    _, labels = next(iter(dm.train_dataloader()))
    assert labels.tolist() == [-1, -1]


def test_bad_setups_stop_early_naming_the_path(tmp_path: Path, imagenet_tree: Path, caplog) -> None:
    with pytest.raises(UserError, match=str(tmp_path / "missing" / "train")):
        ImageDataModule(root=str(tmp_path / "missing"), num_workers=0).setup("fit")
    with pytest.raises(UserError, match="--data.root"):
        ImageDataModule(root=None, num_workers=0).setup("fit")
    with pytest.raises(UserError, match="batch_size"):
        ImageDataModule(root=str(imagenet_tree), batch_size=64, num_workers=0).setup("fit")
    with pytest.raises(UserError, match="pad_to"):
        ImageDataModule(root=str(imagenet_tree), pad_to=32)
    # A missing validation folder only disables validation, with a warning naming it.
    dm = ImageDataModule(root=str(imagenet_tree), val_split="holdout", batch_size=4, num_workers=0,
                         train_transform=_small_views(0))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.data.datamodule"):
        dm.setup("fit")
    assert str(imagenet_tree / "holdout") in caplog.text and dm.val_dataloader() == []


class _ViewConsumer(L.LightningModule):
    """Records what Lightning hands to the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_shapes: list[list[tuple[int, ...]]] = []
        self.val_shapes: list[tuple[int, ...]] = []

    def training_step(self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
        views, _ = batch
        self.train_shapes.append([tuple(v.shape) for v in views])
        return self.layer(views[0].mean(dim=(2, 3))).mean()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_shapes.append(tuple(batch[0].shape))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_consumes_the_datamodule(imagenet_tree: Path) -> None:
    dm = ImageDataModule(root=str(imagenet_tree), train_transform=_small_views(), batch_size=4, num_workers=0)
    model = _ViewConsumer()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.train_shapes == [[(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2] * 4
    assert model.val_shapes == [(4, 3, 32, 32), (2, 3, 32, 32)]


def test_worker_and_main_process_loaders_draw_the_same_augmentations(imagenet_tree: Path) -> None:
    """Per-sample seeding gives the same uint8 views whether the samples are read in the main
    process (RNG states saved and restored around each sample) or in workers (reseeded only),
    and reading a sample in the main process leaves torch's, NumPy's and Python's RNGs as they were."""
    import random

    import numpy as np

    views = MultiCropTransform(global_crop_size=32, local_crop_size=16, n_local_crops=2, photometric="device")
    batches = {}
    for workers in (0, 2):
        dm = ImageDataModule(root=str(imagenet_tree), train_transform=views, batch_size=4, num_workers=workers)
        dm.setup("fit")
        batches[workers] = list(dm.train_dataloader())
    assert len(batches[0]) == len(batches[2]) > 1
    for (v0, y0), (v2_, y2) in zip(batches[0], batches[2]):
        assert torch.equal(y0, y2) and all(torch.equal(a, b) for a, b in zip(v0, v2_))
    dataset = dm.train_dataloader().dataset
    expected = []
    for read in (False, True):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        if read:
            dataset[1]
        expected.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]))
    assert expected[0] == expected[1]
