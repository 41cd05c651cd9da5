"""End to end through the CLI, as a user runs it: supervised and distilled recipes for a few steps on
an ImageNet-layout folder of real Fashion-MNIST PNGs, ``xcit-ssl validate``, fine-tuning, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcit_ssl.cli import main
from xcit_ssl.data.datasets import FashionMNIST

TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2
# a tiny backbone keeps each run to seconds; everything else is the recipe's
TINY = ["--model.backbone.init_args.depth", "1", "--model.backbone.init_args.embed_dim", "32",
        "--model.backbone.init_args.num_heads", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val}/<class>/*.png``: real 28 px Fashion-MNIST images, all 10 classes."""
    root = tmp_path_factory.mktemp("fmnist_folder")
    data = FashionMNIST(train=True)
    for label, name in enumerate(data.classes):
        folder = name.replace("/", "_").replace(" ", "_").lower()
        for k, i in enumerate(np.flatnonzero(data.targets == label)[: TRAIN_PER_CLASS + VAL_PER_CLASS]):
            split = "train" if k < TRAIN_PER_CLASS else "val"
            path = root / split / folder / f"{k:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i]).save(path)
    return root


def _fit_args(recipe: str, root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--recipe", recipe, *TINY, "--data.dataset", "imagefolder", "--data.root", str(root),
            "--data.pad_to", "null", "--data.batch_size", "8", "--data.num_workers", "0",
            "--data.limit_val_samples", "null", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--model.mixup.prob", "1.0",  # the demo recipes ship with mixing off
            "--run_dir", str(run_dir), *extra]  # fmt: skip


def _metric_columns(run: Path) -> set[str]:
    with (run / "metrics.csv").open() as fh:
        return set(next(csv.reader(fh)))


@pytest.fixture(scope="module")
def sup_run(fmnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "sup"
    assert main(_fit_args("sup_nano_fmnist", fmnist_folder, run)) == 0
    return run


def test_supervised_recipe_trains_validates_and_checkpoints(sup_run: Path) -> None:
    ckpt = torch.load(sup_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["xcit_ssl"]["method"] == "supervised" and ckpt["xcit_ssl"]["img_size"] == 32
    assert ckpt["xcit_ssl"]["recipe"] == "sup_nano_fmnist"
    assert {"val/top1", "val/top5", "val_ema/top1", "val_ema/top5", "train/loss"} <= _metric_columns(sup_run)
    assert "xcit_ssl.methods.supervised.Supervised" in (sup_run / "config.yaml").read_text()


def test_distilled_recipe_with_the_supervised_teacher(sup_run: Path, fmnist_folder: Path, tmp_path: Path) -> None:
    teacher = str(sup_run / "checkpoints" / "last.ckpt")
    args = _fit_args("distill_nano_fmnist", fmnist_folder, tmp_path / "distill", "--model.teacher_weights", teacher)
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "distill" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["xcit_ssl"]["method"] == "distilled"
    assert {"train/distill_loss", "train/base_loss", "val_ema/top1"} <= _metric_columns(tmp_path / "distill")


def test_validate_command_on_the_checkpoint(sup_run: Path, fmnist_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "val.json"
    ckpt = str(sup_run / "checkpoints" / "last.ckpt")
    assert main(["validate", "--checkpoint", ckpt, "--data.root", str(fmnist_folder), "--num_workers", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["num_images"] == 10 * VAL_PER_CLASS and 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["transform"] == {"img_size": 32, "crop_pct": 1.0, "resize_size": 32, "interpolation": "bicubic",
                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert result["weights"]["checkpoint_key"] == "ema" and result["weights"]["num_classes"] == 10


def test_fine_tune_at_a_higher_resolution_from_the_checkpoint(sup_run: Path, fmnist_folder: Path, tmp_path: Path) -> None:
    # the 384-from-224 recipe in miniature: 48 px from 32 px weights, no positional interpolation
    ckpt = str(sup_run / "checkpoints" / "last.ckpt")
    args = _fit_args("sup_nano_fmnist", fmnist_folder, tmp_path / "ft", "--model.pretrained", ckpt,
                     "--model.checkpoint_key", "ema", "--model.backbone.init_args.img_size", "48",
                     "--data.train_transform.init_args.img_size", "48")  # fmt: skip
    assert main(args) == 0
    tuned = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert tuned["xcit_ssl"]["img_size"] == 48 and tuned["hyper_parameters"]["pretrained"] == ckpt


def test_teacher_class_mismatch_exits_with_code_2(sup_run: Path, fmnist_folder: Path, tmp_path: Path, capsys) -> None:
    # the UserError is raised while LightningCLI instantiates the model (jsonargparse wraps it)
    teacher = str(sup_run / "checkpoints" / "last.ckpt")
    mismatch = _fit_args("distill_nano_fmnist", fmnist_folder, tmp_path / "bad", "--model.teacher_weights", teacher,
                         "--model.backbone.init_args.num_classes", "5")  # fmt: skip
    assert main(mismatch) == 2
    assert "predicts 10 classes but the student head has 5" in capsys.readouterr().err


def test_validate_refusals_exit_with_code_2(sup_run: Path, fmnist_folder: Path, tmp_path: Path, capsys) -> None:
    teacher = str(sup_run / "checkpoints" / "last.ckpt")
    assert main(["validate", "--checkpoint", str(tmp_path / "nope.ckpt"), "--data.root", str(fmnist_folder)]) == 2
    assert "not found" in capsys.readouterr().err
    headless = tmp_path / "backbone.pth"
    torch.save({k.removeprefix("backbone."): v for k, v in torch.load(teacher, weights_only=True)["state_dict"].items()
                if k.startswith("backbone.") and ".head." not in k and not k.startswith("backbone.head")}, headless)  # fmt: skip
    assert main(["validate", "--weights", str(headless), "--backbone", "xcit_nano_12_p8_224",
                 "--data.root", str(fmnist_folder)]) == 2  # fmt: skip
    assert "no classifier head" in capsys.readouterr().err
