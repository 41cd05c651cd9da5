"""ImageDataModule end to end: config parsing, batches from real files, workers, errors, Lightning,
and the training sampler's split of one global order over ranks and accumulation steps."""

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

from torch.utils.data import DistributedSampler

from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.resumable import EpochTaggedSampler, default_sampler, distributed_order
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


# ---- the sampler: one global order dealt to ranks and accumulation steps -------------------------


def _stream(n: int, world: int, rank: int, batch: int, accumulate: int = 1, epoch: int = 1, **kw) -> list[int]:
    sampler = EpochTaggedSampler(
        default_sampler(range(n), world, rank, seed=5), epoch, batch_size=batch, accumulate=accumulate, **kw
    )  # fmt: skip
    return [i - epoch * n for i in sampler]


def _steps(n: int, world: int, batch: int, accumulate: int) -> list[list[list[int]]]:
    """Each optimizer step's micro-batches (sorted), as ``world`` ranks with ``drop_last`` train them."""
    steps: dict[int, list[list[int]]] = {}
    for rank in range(world):
        stream = _stream(n, world, rank, batch, accumulate, drop_last=True)
        for m in range(len(stream) // batch):  # the loader's drop_last
            steps.setdefault(m // accumulate, []).append(sorted(stream[m * batch : (m + 1) * batch]))
    return [sorted(v) for _, v in sorted(steps.items())]


@pytest.mark.parametrize("n, world, batch", [(36, 2, 4), (37, 3, 4), (63, 2, 32), (5, 5, 1), (100, 4, 7)])
def test_one_micro_batch_per_step_deals_exactly_as_distributed_sampler(n: int, world: int, batch: int) -> None:
    """Without accumulation every rank gets what torch's DistributedSampler gives it (padding
    included): runs and checkpoints of earlier versions keep their sample order."""
    for rank in range(world):
        reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
        reference.set_epoch(1)
        assert _stream(n, world, rank, batch) == list(reference)
        assert _stream(n, world, rank, batch, drop_last=True)[: len(reference) // batch * batch] == list(reference)[
            : len(reference) // batch * batch
        ]


@pytest.mark.parametrize("n", [48, 50, 100])
def test_splits_of_one_global_batch_train_the_same_micro_batches(n: int) -> None:
    """2 devices x 4 and 1 device x 4 x accumulation 2 (and 4x1, 2x2, 1x4): the same micro-batches
    in every optimizer step, each step a consecutive slice of the epoch's order, whole steps only."""
    assert _steps(n, 2, 4, 1) == _steps(n, 1, 4, 2)
    assert _steps(n, 4, 4, 1) == _steps(n, 2, 4, 2) == _steps(n, 1, 4, 4)
    order = distributed_order(default_sampler(range(n), 1, 0, seed=5), 1, 1).tolist()
    steps = _steps(n, 1, 4, 2)
    assert len(steps) == n // 8 and all(len(s) == 2 for s in steps)  # no partial last window
    for k, step in enumerate(steps):
        assert sorted(sum(step, [])) == sorted(order[8 * k : 8 * k + 8])


def test_sampler_state_resumes_another_split_at_the_same_global_sample() -> None:
    n, epoch = 50, 1
    uninterrupted = _stream(n, 1, 0, 4, accumulate=2, drop_last=True)
    # two ranks of 4, interrupted after 3 optimizer steps (each rank's state says 12 yielded)
    ranks = [EpochTaggedSampler(default_sampler(range(n), 2, r, seed=5), epoch, batch_size=4, drop_last=True) for r in range(2)]
    iterators = [iter(s) for s in ranks]
    for it in iterators:
        for _ in range(12):
            next(it)
    state = ranks[0].state_dict()
    assert state == {"epoch": 1, "yielded": 12, "world_size": 2, "batch_size": 4, "accumulate": 1, "position": 24}
    one = EpochTaggedSampler(default_sampler(range(n), 1, 0, seed=5), 0, batch_size=4, accumulate=2, drop_last=True)
    one.load_state_dict(state)
    assert [i - epoch * n for i in one] == uninterrupted[24:]
    # a state of an earlier version (no split): skips what it yielded, as it always did
    legacy = EpochTaggedSampler(default_sampler(range(n), 1, 0, seed=5), 0, batch_size=4, drop_last=True)
    legacy.load_state_dict({"epoch": 1, "yielded": 8})
    assert [i - epoch * n for i in legacy] == _stream(n, 1, 0, 4, drop_last=True)[8:]
    # another global batch, or a position inside an optimizer step, cannot continue there
    with pytest.raises(UserError, match="global batches of 8 .* this run's are 4"):
        EpochTaggedSampler(default_sampler(range(n), 1, 0, seed=5), batch_size=4).load_state_dict(state)
    inside = dict(state, yielded=2, position=4)
    with pytest.raises(UserError, match="inside an optimizer step.*--trainer.devices 2"):
        one.load_state_dict(inside)


def test_datamodule_deals_whole_global_batches_under_accumulation(imagenet_tree: Path) -> None:
    """18 images, batch 4: accumulation 3 trains one step of 3 micro-batches (before: a second step
    of one micro-batch, which Lightning scaled by 1/3 all the same); 1 and 2 train 4 micro-batches."""
    dm = ImageDataModule(root=str(imagenet_tree), train_transform=_small_views(0), batch_size=4, num_workers=0)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, accumulate_grad_batches=2, current_epoch=0)
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 4
    dm.trainer.accumulate_grad_batches = 1
    assert len(dm.train_dataloader()) == 4
    dm.trainer.accumulate_grad_batches = 3  # 12 per step: one step of 3 micro-batches
    assert len(dm.train_dataloader()) == 3
