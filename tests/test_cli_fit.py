"""`xcit-ssl fit` end to end, as a user runs it, on an ImageNet-layout folder of real images."""

from __future__ import annotations

import gzip
from pathlib import Path


import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from xcit_ssl.cli import main

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_image_folder(root: Path, per_class: int = 6, classes: int = 3) -> Path:
    """Fashion-MNIST images as PNG/JPEG files in root/{train,val}/<class>/."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for split, offset in (("train", 0), ("val", 1000)):
        for c in range(classes):
            idx = np.flatnonzero(labels[offset:] == c)[:per_class] + offset
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for j, i in enumerate(idx):
                ext = "png" if j % 2 else "JPEG"
                Image.fromarray(images[i]).convert("RGB").resize((32, 32)).save(folder / f"{i}.{ext}")
    return root


def _tiny_recipe(tmp_path: Path, data_root: Path) -> Path:
    recipe = yaml.safe_load(Path("recipes/dino_nano_fmnist.yaml").read_text())
    model = recipe["model"]["init_args"]
    model["backbone"]["init_args"].update(depth=1, embed_dim=32, num_heads=2)
    model["dino"].update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    data = recipe["data"]["init_args"]
    data.update(dataset="imagefolder", root=str(data_root), batch_size=4, num_workers=0, pad_to=None)
    data["train_transform"]["init_args"]["n_local_crops"] = 2
    recipe["trainer"].update(max_epochs=2, limit_train_batches=2, enable_model_summary=False, log_every_n_steps=1)
    recipe["trainer"]["callbacks"] = [
        {
            "class_path": "xcit_ssl.evaluation.online.OnlineKNN",
            "init_args": {
                "dataset": "imagefolder", "root": str(data_root), "train_split": "train", "val_split": "val",
                "n_train": 12, "n_val": 6, "pad_to": None, "k": 3, "batch_size": 8,
            },
        }
    ]  # fmt: skip
    path = tmp_path / "tiny_dino.yaml"
    path.write_text("# tiny DINO for the CLI test\n" + yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("imagenet_layout"))


def test_fit_writes_run_folder_reruns_and_resumes(tmp_path: Path, image_root: Path) -> None:
    recipe = _tiny_recipe(tmp_path, image_root)
    run = tmp_path / "runs" / "tiny"
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(run)]) == 0
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 1  # written at the end of epoch index 1
    assert ckpt["xcit_ssl"]["backbone"]["name"] == "xcit_nano_12_p8_224"
    assert ckpt["xcit_ssl"]["recipe"] == "tiny_dino"
    assert any(k.startswith("teacher_backbone.") for k in ckpt["state_dict"])
    metrics = (run / "metrics.csv").read_text()
    assert "train/loss" in metrics and "knn/top1" in metrics and "collapse/teacher_entropy" in metrics

    # the saved config reruns the same run; the old folder is kept, the rerun goes next to it
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run_dir"] == str(run) and saved["model"]["init_args"]["dino"]["out_dim"] == 64
    assert main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_epochs", "1"]) == 0
    assert (tmp_path / "runs" / "tiny_1" / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    # --config of a run + --ckpt_path last resumes that run (not its newest sibling) and continues its step count
    assert main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_epochs", "3", "--ckpt_path", "last"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 6
    assert torch.load(tmp_path / "runs" / "tiny_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_fit_bad_inputs_exit_2_with_one_message(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", "--recipe", "dino_smal_p8"]) == 2
    assert "unknown recipe 'dino_smal_p8'" in capsys.readouterr().err
    recipe = _tiny_recipe(tmp_path, image_root)
    assert main(["fit", "--recipe", str(recipe), "--model.dino.teacher_tmp", "0.1"]) == 2
    assert "did you mean 'teacher_temp'" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    code = main(["fit", "--recipe", str(recipe), "--data.root", str(missing), "--run_dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
