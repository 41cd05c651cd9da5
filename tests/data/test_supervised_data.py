"""Supervised data: repeated-augmentation sampler under 2 ranks, transforms, the data module."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xcit_ssl.data.supervised import (
    RepeatAugSampler,
    SupervisedDataModule,
    SupervisedTrainTransform,
    build_supervised_eval_transform,
    eval_resize_size,
)
from xcit_ssl.errors import UserError


def _ranks(n: int, world: int = 2, epoch: int = 0, **kw) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = RepeatAugSampler(range(n), num_replicas=world, rank=rank, seed=3, **kw)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("n", [20, 7])
def test_full_epoch_covers_the_data_set_under_two_ranks(n: int) -> None:
    r0, r1 = _ranks(n, full_epoch=True)
    assert len(r0) == len(r1) == -(-3 * n // 2)  # ceil(3N / 2): equal work per rank
    counts = Counter(r0 + r1)
    assert set(counts) == set(range(n))  # every image, on some rank
    assert 3 * n <= len(r0) + len(r1) < 3 * n + 2  # padding to equal lengths adds at most one copy
    assert all(c >= 3 for c in counts.values())
    if 3 * n % 2 == 0:
        assert all(c == 3 for c in counts.values())


def test_ranks_deal_one_shared_repeated_permutation() -> None:
    r0, r1 = _ranks(12, full_epoch=True)
    stream = [i for pair in zip(r0, r1) for i in pair]  # position p went to rank p % 2
    perm = stream[::3]
    assert sorted(perm) == list(range(12))
    assert stream == [i for i in perm for _ in range(3)]
    # the copies of an image are spread over both ranks, each augmented there
    for image in range(12):
        assert image in r0 and image in r1


def test_deit_epoch_length_and_new_images_every_epoch() -> None:
    n = 30
    seen: set[int] = set()
    first_epoch: set[int] = set()
    for epoch in range(12):
        r0, r1 = _ranks(n, epoch=epoch)
        assert len(r0) == len(r1) == n // 2  # as many steps as a plain DistributedSampler
        counts = Counter(r0 + r1)
        assert len(counts) == n // 3 and set(counts.values()) == {3}  # N/3 images, 3 copies each
        if epoch == 0:
            first_epoch = set(counts)
        elif epoch == 1:
            assert set(counts) != first_epoch  # the permutation changes with the epoch
        seen |= set(counts)
    assert seen == set(range(n))  # successive epochs cover the data set


def test_sampler_refuses_bad_arguments() -> None:
    with pytest.raises(UserError, match="num_repeats"):
        RepeatAugSampler(range(4), num_replicas=1, rank=0, num_repeats=0)
    with pytest.raises(ValueError, match="rank"):
        RepeatAugSampler(range(4), num_replicas=2, rank=2)


def test_eval_transform_resizes_by_crop_ratio_then_center_crops() -> None:
    assert eval_resize_size(224, 1.0) == 224
    assert eval_resize_size(224, 0.875) == 256
    assert eval_resize_size(384, 1.0) == 384
    # a smooth, asymmetric image: a wrong size or an off-centre crop shows, and bicubic overshoot
    # (where resize kernels differ by rounding) does not
    yy, xx = np.mgrid[0:40, 0:50]
    pixels = np.stack([4 * yy + xx, 5 * xx, 200 - 2 * yy - xx], axis=-1)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    out = build_supervised_eval_transform(32, crop_pct=0.875)(image)
    # reference written with torchvision's functional ops: shorter side 36, center crop 32
    ref = TF.pil_to_tensor(image)
    ref = TF.resize(ref, 36, interpolation=InterpolationMode.BICUBIC, antialias=True)
    ref = TF.center_crop(ref, 32).float() / 255
    ref = TF.normalize(ref, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, ref, atol=2 / 255 / 0.224, rtol=0)  # 2 grey levels
    with pytest.raises(UserError, match="crop_pct"):
        eval_resize_size(224, 1.5)


def test_train_transform_is_the_xcit_pipeline() -> None:
    transform = SupervisedTrainTransform(img_size=32, scale=(0.35, 1.0))
    names = [type(t).__name__ for t in transform.transform.transforms]
    assert names[0].startswith("RandomResizedCrop") and "RandAugment" in names and names[-1] == "RandomErasing"
    erasing = transform.transform.transforms[-1]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    image = Image.fromarray(np.full((28, 28), 200, dtype=np.uint8)).convert("L")  # grey: converted to RGB
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_posterize_with_zero_bits_gives_black_instead_of_crashing() -> None:
    # rand-m9-mstd0.5 reaches magnitude 10 in ~2 % of draws: PosterizeIncreasing then keeps 0 bits,
    # which Pillow >= 11 refuses; the RandAugment ops of our transform return black as old Pillow did
    transform = SupervisedTrainTransform(img_size=32)
    ops = [op for t in transform.transform.transforms for op in getattr(t, "ops", []) if "Posterize" in op.name]
    assert ops
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(ops[0].aug_fn(image, 0)).max() == 0
    assert np.asarray(ops[0].aug_fn(image, 1)).tolist() == np.asarray(image.point(lambda v: v & 0x80)).tolist()


def test_datamodule_on_an_imagenet_folder(imagenet_tree: Path) -> None:
    dm = SupervisedDataModule(
        root=str(imagenet_tree), batch_size=4, num_workers=0, repeated_aug=3,
        train_transform=SupervisedTrainTransform(img_size=32, scale=(0.35, 1.0)),
    )  # fmt: skip
    dm.setup("fit")
    assert dm.num_classes == 3
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler.inner, RepeatAugSampler) and len(loader.sampler) == 18
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert labels[0] == labels[1] == labels[2]  # one process: the 3 copies of an image are consecutive
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape[1:] == (3, 32, 32) and set(val_labels.tolist()) <= {0, 1, 2}
    plain = SupervisedDataModule(root=str(imagenet_tree), batch_size=4, num_workers=0, repeated_aug=1,
                                 train_transform=SupervisedTrainTransform(img_size=32))  # fmt: skip
    plain.setup("fit")
    assert not isinstance(plain.train_dataloader().sampler, RepeatAugSampler)


def test_datamodule_refuses_unlabelled_data() -> None:
    with pytest.raises(UserError, match="labels"):
        SupervisedDataModule(root="/nowhere", dataset="flat")
    with pytest.raises(UserError, match="repeated_aug"):
        SupervisedDataModule(root="/nowhere", repeated_aug=0)
