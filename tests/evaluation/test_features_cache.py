"""Feature extraction (order, eval mode, equality with a direct forward) and the on-disk cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from xcit_ssl.evaluation.features import (
    CLSFeatures,
    FeatureCache,
    FeatureSet,
    cached_features,
    embed_loader,
    extract_features,
)
from xcit_ssl.evaluation.protocol import build_feature_transform
from xcit_ssl.files import sha256_file
from xcit_ssl.models.registry import create_backbone


class RandomImages(Dataset):
    """Deterministic random RGB PIL images of varying size with labels i % 3."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.images = [
            Image.fromarray(rng.integers(0, 256, (30 + i % 5, 28 + i % 3, 3), dtype=np.uint8)) for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], i % 3


@pytest.fixture(scope="module")
def model() -> CLSFeatures:
    torch.manual_seed(0)
    backbone = create_backbone("xcit_nano_12_p16_224", depth=1, num_classes=0)
    return CLSFeatures(backbone)


def transform():
    return build_feature_transform(36, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")


def test_extract_matches_direct_forward_in_eval_mode(model: CLSFeatures) -> None:
    ds = RandomImages(11)
    model.train()  # extraction must switch to eval itself (BatchNorm running stats, no drop-path)
    fs = extract_features(model, ds, transform(), batch_size=4, num_workers=0, accelerator="cpu", progress=False)
    assert fs is not None and fs.features.shape == (11, 128) and fs.features.dtype == torch.float32
    assert fs.labels.tolist() == [i % 3 for i in range(11)]
    model.eval()
    with torch.no_grad():
        direct = model(torch.stack([transform()(ds[i][0]) for i in range(11)]))
    torch.testing.assert_close(fs.features, direct, rtol=1e-4, atol=1e-5)
    # the plain loop used by the online monitor gives the same features
    loader = torch.utils.data.DataLoader([(transform()(x), y) for x, y in (ds[i] for i in range(11))], batch_size=5)
    torch.testing.assert_close(embed_loader(model, loader, "cpu").features, direct, rtol=1e-4, atol=1e-5)


def test_transform_shape() -> None:
    out = transform()(Image.new("L", (28, 40)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_cache_hit_miss_and_key(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def compute() -> FeatureSet:
        calls.append(1)
        return FeatureSet(torch.randn(6, 4), torch.arange(6))

    parts = {"weights_sha256": "ab" * 32, "transform": {"crop_size": 32}, "split": "train"}
    key = FeatureCache.make_key(**parts)
    first, hit1 = cached_features(cache, key, parts, compute)
    second, hit2 = cached_features(cache, key, parts, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first.features, second.features) and torch.equal(first.labels, second.labels)
    # anything that changes the features changes the key
    assert FeatureCache.make_key(**{**parts, "transform": {"crop_size": 224}}) != key
    assert FeatureCache.make_key(**{**parts, "weights_sha256": "cd" * 32}) != key
    assert FeatureCache.make_key(**dict(reversed(list(parts.items())))) == key  # order-independent
    # a corrupt entry is a miss that gets rewritten, not a crash
    cache.path(key).write_bytes(b"garbage")
    _, hit3 = cached_features(cache, key, parts, compute)
    assert not hit3 and len(calls) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave no temp files


def test_no_cache_always_computes() -> None:
    calls = []
    for _ in range(2):
        cached_features(None, "k", {}, lambda: calls.append(1) or FeatureSet(torch.zeros(1, 2), torch.zeros(1)))
    assert len(calls) == 2


def test_sha256_file_and_index(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 10_000_001)
    index = tmp_path / "idx.json"
    expected = hashlib.sha256(b"x" * 10_000_001).hexdigest()
    assert sha256_file(f, index, chunk_bytes=1 << 20) == expected
    assert str(f.resolve()) in index.read_text()
    # the index answers without reading the file (same size and mtime) ...
    text = index.read_text().replace(expected, "0" * 64)
    index.write_text(text)
    assert sha256_file(f, index) == "0" * 64
    # ... and any change of the file rehashes
    f.write_bytes(b"y" * 5)
    assert sha256_file(f, index) == hashlib.sha256(b"y" * 5).hexdigest()
