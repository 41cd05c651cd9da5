"""``xcit-ssl attention`` end to end through the CLI, on real Fashion-MNIST PNGs and a non-square
RGB image, and the bad inputs: exit 2, one message, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcit_ssl.analysis.sheets import attention_layout, pca_layout
from xcit_ssl.cli import main
from xcit_ssl.data.datasets import FashionMNIST
from xcit_ssl.models.registry import create_backbone

NAME, OVERRIDES = "xcit_nano_12_p8_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DINO training checkpoint as `fit` writes it (teacher + student, the xcit_ssl entry)."""
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    torch.manual_seed(0)
    teacher = create_backbone(NAME, num_classes=0, **OVERRIDES).state_dict()
    meta = {"backbone": {"name": NAME, "overrides": OVERRIDES}, "img_size": 32, "mean": [0.3] * 3,
            "std": [0.35] * 3, "method": "dino", "recipe": None}  # fmt: skip
    path = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {**{f"teacher_backbone.{k}": v for k, v in teacher.items()},
                               **{f"student_backbone.{k}": v.clone() for k, v in teacher.items()}},
                "xcit_ssl": meta}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folder/fmnist_{0,1,2}.png (28 px grayscale, real) and folder/photos/wide.png (RGB, 60x36)."""
    root = tmp_path_factory.mktemp("images")
    fm = FashionMNIST(train=False)
    for i in range(3):
        Image.fromarray(fm.images[i]).save(root / f"fmnist_{i}.png")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(root / "photos" / "wide.png")
    (root / "notes.txt").write_text("not an image, skipped inside a folder\n")
    return root


def test_attention_sheets_maps_and_pca_for_a_folder(checkpoint: Path, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sheets"
    assert main(["attention", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                 "--pca", "--device", "cpu"]) == 0  # fmt: skip
    assert "4 images -> attention + PCA sheets" in capsys.readouterr().out
    index = json.loads((out / "attention.json").read_text())
    assert index["img_size"] == 32 and index["mean"] == [0.3] * 3 and index["block"] == 1 and index["heads"] == 2
    by_name = {Path(e["source"]).name: e for e in index["images"]}
    assert set(by_name) == {"fmnist_0.png", "fmnist_1.png", "fmnist_2.png", "wide.png"}
    # 60x36 -> shorter side 32: 53x32, cropped to multiples of 8: 48x32, a 4 x 6 grid
    assert by_name["wide.png"]["size"] == [48, 32] and by_name["wide.png"]["grid"] == [4, 6]
    assert by_name["fmnist_0.png"]["grid"] == [4, 4]
    maps = np.load(out / "wide_attention.npy")
    assert maps.shape == (2, 4, 6) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(axis=(1, 2)) + by_name["wide.png"]["cls_weight"], 1.0, rtol=1e-5)
    with Image.open(out / "wide_attention.png") as sheet:
        assert sheet.size == attention_layout(32, 48, 2).size
    with Image.open(out / "fmnist_1_pca.png") as sheet:
        assert sheet.size == pca_layout(32, 32).size
    assert np.load(out / "wide_pca.npy").shape == (4, 6, 3)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_block_img_size_and_random_init(images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # --random_init caches its seed-0 weights under ./runs/random_init
    out = tmp_path / "rand"
    assert main(["attention", "--random_init", "xcit_nano_12_p16_224", "--images", str(images / "fmnist_0.png"),
                 "--out", str(out), "--block", "0", "--img_size", "48", "--device", "cpu"]) == 0  # fmt: skip
    index = json.loads((out / "attention.json").read_text())
    assert index["block"] == 0 and index["img_size"] == 48 and index["heads"] == 4
    assert np.load(out / "fmnist_0_attention.npy").shape == (4, 3, 3)
    assert not (out / "fmnist_0_pca.png").exists()


def _fails(argv: list[str], message: str, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_and_write_nothing(checkpoint: Path, images: Path, tmp_path: Path, capsys) -> None:
    base = ["attention", "--checkpoint", str(checkpoint), "--device", "cpu"]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    out = tmp_path / "out"
    _fails([*base, "--images", str(images / "fmnist_0.png"), str(bad), "--out", str(out)],
           f"--images: {bad} is not a readable image", capsys)  # fmt: skip
    assert not out.exists()
    _fails([*base, "--images", str(images / "nothing_here"), "--out", str(out)], "no such file or folder", capsys)
    _fails([*base, "--images", str(images), "--out", str(out), "--block", "2"],
           "--block 2: the backbone has 2 class-attention blocks", capsys)  # fmt: skip
    _fails([*base, "--images", str(images), "--out", str(out), "--threshold", "0"], "--threshold 0.0", capsys)
    assert not out.exists()

    import timm

    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0).state_dict(), vit)
    _fails(["attention", "--weights", str(vit), "--backbone", "xcit_nano_12_p16_224", "--images", str(images),
            "--out", str(out)], "has no XCiT class-attention blocks", capsys)  # fmt: skip
    _fails(["attention", "--weights", str(vit), "--images", str(images), "--out", str(out)],
           "is it a ViT or another architecture?", capsys)  # fmt: skip
    assert not out.exists()

    out.mkdir()
    (out / "keep.png").write_bytes(b"mine")
    _fails([*base, "--images", str(images), "--out", str(out)], "already holds 1 entries; pass --overwrite", capsys)
    assert sorted(p.name for p in out.iterdir()) == ["keep.png"] and (out / "keep.png").read_bytes() == b"mine"
    assert main([*base, "--images", str(images / "fmnist_2.png"), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention.json", "fmnist_2_attention.npy",
                                                     "fmnist_2_attention.png", "keep.png"]  # fmt: skip
