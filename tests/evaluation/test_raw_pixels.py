"""`knn --raw_pixels` against an independent k-NN on the flattened pixels, and the pooling option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli_fit import _write_image_folder
from xcit_ssl.commands.evaluate import knn_main
from xcit_ssl.evaluation.features import CLSFeatures
from xcit_ssl.models import create_backbone

MEAN, STD = [0.3, 0.3, 0.3], [0.35, 0.35, 0.35]
SMALL = ["--features.resize_size", "32", "--features.crop_size", "32", "--num_workers", "0", "--progress", "false",
         "--device", "cpu", "--batch_size", "16", "--features.mean", str(MEAN), "--features.std", str(STD)]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("pixels"), per_class=10)


def _pixels(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(split_dir.glob("*/*"))
    x = np.stack([(np.asarray(Image.open(f).convert("RGB"), np.float64) / 255 - MEAN) / STD for f in files])
    x = x.transpose(0, 3, 1, 2).reshape(len(files), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([classes.index(f.parent.name) for f in files])


def test_raw_pixels_equals_an_independent_weighted_knn(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pixels.json"
    assert knn_main(["--raw_pixels", "true", "--data.root", str(folder), *SMALL, "--knn.ks", "[3, 7]",
                     "--out", str(out), "--no_cache", "true"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["weights"]["backbone"] == "raw_pixels" and result["num_images"] == {"train": 30, "val": 30}
    classes = sorted(p.name for p in (folder / "train").iterdir())
    xtr, ytr = _pixels(folder / "train", classes)
    xva, yva = _pixels(folder / "val", classes)
    sim = xva @ xtr.T  # cosine similarity
    for k in (3, 7):
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(xva), len(classes)))
        for i in range(len(xva)):
            for j in top[i]:
                votes[i, ytr[j]] += np.exp(sim[i, j] / 0.07)
        top1 = 100.0 * np.mean(votes.argmax(1) == yva)
        assert result["results"][str(k)]["top1"] == pytest.approx(top1, abs=1e-6)


def test_raw_pixels_refuses_weights(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xcit_ssl.cli import main

    assert main(["knn", "--raw_pixels", "true", "--random_init", "xcit_nano_12_p16_224", "--data.root", str(folder)]) == 2
    assert "--raw_pixels evaluates the images themselves" in capsys.readouterr().err


def test_pooling_cls_plus_mean_patch_for_dino_and_supervised_features(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("xcit_nano_12_p16_224", num_classes=0, depth=1).eval()
    x = torch.randn(2, 3, 32, 48)
    tokens = backbone.forward_features(x)
    both = CLSFeatures(backbone, "cls+mean_patch")(x)
    assert both.shape == (2, 2 * backbone.embed_dim)
    torch.testing.assert_close(both[:, : backbone.embed_dim], tokens[:, 0])
    torch.testing.assert_close(both[:, backbone.embed_dim :], tokens[:, 1:].mean(1))
    # the pyramid, from its definition: CLS, grid mean, then the quadrant means, row-major; 32 x 48 px at
    # patch 16 is a 2 x 3 grid, so the middle column belongs to both the left and the right quadrants
    d = backbone.embed_dim
    pyramid = CLSFeatures(backbone, "cls+pyramid")(x)
    assert pyramid.shape == (2, 6 * d)
    grid = tokens[:, 1:].reshape(2, 2, 3, d)  # [B, rows, cols, D]
    quads = [grid[:, r : r + 1, c0:c1].mean((1, 2)) for r in (0, 1) for c0, c1 in ((0, 2), (1, 3))]
    torch.testing.assert_close(pyramid, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1), *quads], 1))
    with pytest.raises(ValueError, match="at least 2x2"):
        CLSFeatures(backbone, "cls+pyramid")(torch.randn(1, 3, 16, 48))
    # through the command: a DINO-style and a supervised-style checkpoint, features of width 2D, own cache keys
    sd = backbone.state_dict()
    meta = {"backbone": {"name": "xcit_nano_12_p16_224", "overrides": {"depth": 1}}, "img_size": 32}
    dino, sup = tmp_path / "dino.ckpt", tmp_path / "sup.ckpt"
    torch.save({"state_dict": {**{f"teacher_backbone.{k}": v for k, v in sd.items()},
                               **{f"student_backbone.{k}": v for k, v in sd.items()}},
                "xcit_ssl": {**meta, "method": "dino"}}, dino)  # fmt: skip
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()},
                "xcit_ssl": {**meta, "method": "supervised"}}, sup)  # fmt: skip
    for n, ckpt in enumerate((dino, sup), start=1):
        tops = {}
        for pooling in ("cls", "cls+mean_patch", "cls+pyramid"):
            out = tmp_path / f"{ckpt.stem}_{pooling}.json"
            args = ["--checkpoint", str(ckpt), "--data.root", str(folder), *SMALL, "--knn.ks", "[5]",
                    "--features.pooling", pooling, "--out", str(out)]  # fmt: skip
            assert knn_main(args) == 0
            record = json.loads(out.read_text())
            assert record["protocol_config"]["features"]["pooling"] == pooling
            assert record["weights"]["embed_dim"] == {"cls": 1, "cls+mean_patch": 2, "cls+pyramid": 6}[pooling] * d
            tops[pooling] = record["results"]["5"]["top1"]
        # the pooling is part of the feature cache key: 2 splits x 3 poolings per checkpoint
        assert len(list((tmp_path / "eval" / "feature_cache").glob("*.safetensors"))) == 6 * n


@pytest.mark.parametrize(
    ("pooling", "crop", "needed", "fallback"),
    [("cls+pyramid", 16, 32, "cls+mean_patch"), ("cls+pyramid3", 32, 64, "cls+pyramid")],
)
def test_pyramid_on_a_grid_too_small_names_the_flag(
    folder: Path, capsys: pytest.CaptureFixture[str], pooling: str, crop: int, needed: int, fallback: str
) -> None:
    from xcit_ssl.cli import main

    argv = ["knn", "--random_init", "xcit_nano_12_p16_224", "--data.root", str(folder), *SMALL,
            "--features.crop_size", str(crop), "--features.pooling", pooling, "--no_cache", "true"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--features.crop_size {needed}" in err and f"--features.pooling {fallback}" in err and pooling in err


def test_three_level_pyramid_from_its_definition() -> None:
    # cls+pyramid3: CLS, grid mean, the 2 x 2 quadrant means, then the 4 x 4 cell means, row-major. A
    # 64 x 80 image at patch 16 is a 4 x 5 grid: rows are cells of their own, and column cell j spans
    # columns floor(5j/4) to ceil(5(j+1)/4) - 1 (adaptive average pooling's bins, overlapping by one)
    torch.manual_seed(0)
    backbone = create_backbone("xcit_nano_12_p16_224", num_classes=0, depth=1).eval()
    x = torch.randn(2, 3, 64, 80)
    tokens = backbone.forward_features(x)
    d = backbone.embed_dim
    grid = tokens[:, 1:].reshape(2, 4, 5, d)
    halves_r, halves_c = ((0, 2), (2, 4)), ((0, 3), (2, 5))
    quads = [grid[:, r0:r1, c0:c1].mean((1, 2)) for r0, r1 in halves_r for c0, c1 in halves_c]
    cols = [(math.floor(5 * j / 4), math.ceil(5 * (j + 1) / 4)) for j in range(4)]
    assert cols == [(0, 2), (1, 3), (2, 4), (3, 5)]
    cells = [grid[:, r, c0:c1].mean(1) for r in range(4) for c0, c1 in cols]
    three = CLSFeatures(backbone, "cls+pyramid3")(x)
    assert three.shape == (2, 22 * d)
    torch.testing.assert_close(three, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1), *quads, *cells], 1))
    # the two-level pyramid is its first 6D
    torch.testing.assert_close(three[:, : 6 * d], CLSFeatures(backbone, "cls+pyramid")(x))
    with pytest.raises(ValueError, match="at least 4x4"):
        CLSFeatures(backbone, "cls+pyramid3")(torch.randn(1, 3, 48, 80))


def test_random_init_of_a_checkpoints_architecture(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`--random_init CKPT` re-initialises the checkpoint's own architecture (a recipe's fewer blocks),
    seed 0, so the random-init baseline row is the same network as the trained one."""
    from safetensors import safe_open

    from xcit_ssl.cli import main
    from xcit_ssl.models.checkpoints import load_backbone

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    trained = create_backbone("xcit_nano_12_p16_224", num_classes=0, depth=2)
    ckpt = tmp_path / "dino.ckpt"
    meta = {"backbone": {"name": "xcit_nano_12_p16_224", "overrides": {"depth": 2}}, "img_size": 32, "method": "dino"}
    torch.save({"state_dict": {f"teacher_backbone.{k}": v for k, v in trained.state_dict().items()},
                "xcit_ssl": meta}, ckpt)  # fmt: skip
    out = tmp_path / "random.json"
    assert knn_main(["--random_init", str(ckpt), "--data.root", str(folder), *SMALL, "--knn.ks", "[5]",
                     "--out", str(out), "--no_cache", "true"]) == 0  # fmt: skip
    weights = tmp_path / "runs" / "random_init" / "xcit_nano_12_p16_224_depth2_seed0.safetensors"
    assert json.loads(out.read_text())["weights"]["path"].endswith(weights.name)
    fresh = load_backbone(str(weights))
    assert len(fresh.blocks) == 2 and fresh.embed_dim == trained.embed_dim
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = create_backbone("xcit_nano_12_p16_224", num_classes=0, depth=2).state_dict()
    with safe_open(str(weights), "pt") as f:
        for key, value in expected.items():
            torch.testing.assert_close(f.get_tensor(key), value)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    capsys.readouterr()
    assert main(["knn", "--random_init", str(tmp_path / "missing.ckpt"), "--data.root", str(folder)]) == 2
    assert "neither an XCiT variant" in capsys.readouterr().err
