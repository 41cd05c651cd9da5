"""``knn_main`` / ``linear_main`` end to end on an ImageNet-layout folder of real PNG files
(Fashion-MNIST images) with tiny backbone checkpoints written here, plus the user-error cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xcit_ssl.data.datasets import FashionMNIST
from xcit_ssl.errors import UserError
from xcit_ssl.commands.evaluate import knn_main, linear_main
from xcit_ssl.evaluation.knn import knn_evaluate
from xcit_ssl.config import list_protocols, protocol_path
from xcit_ssl.evaluation.protocol import build_feature_transform
from xcit_ssl.models.registry import create_backbone

NAME, OVERRIDES = "xcit_nano_12_p16_224", {"depth": 1}
MEAN, STD = [0.3, 0.3, 0.3], [0.35, 0.35, 0.35]
CLASSES = ["bag", "sneaker", "trouser"]  # Fashion-MNIST labels 8, 7, 1
PER_CLASS = {"train": 10, "val": 4}
SMALL = ["--features.resize_size", "32", "--features.crop_size", "32", "--num_workers", "0",
         "--progress", "false", "--device", "cpu", "--batch_size", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{train,val}/<class>/*.png written from real Fashion-MNIST test images."""
    root = tmp_path_factory.mktemp("imagenet_layout")
    fm = FashionMNIST(train=False)
    for label, name in zip((8, 7, 1), CLASSES):
        idx = np.flatnonzero(fm.targets == label)
        start = 0
        for split, n in PER_CLASS.items():
            (root / split / name).mkdir(parents=True)
            for j, i in enumerate(idx[start : start + n]):
                Image.fromarray(fm.images[i]).save(root / split / name / f"{j:03d}.png")
            start += n
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A DINO training checkpoint (teacher != student), a supervised one, and an export."""
    out = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    teacher = create_backbone(NAME, num_classes=0, **OVERRIDES).state_dict()
    student = create_backbone(NAME, num_classes=0, **OVERRIDES).state_dict()
    meta = {"backbone": {"name": NAME, "overrides": OVERRIDES}, "img_size": 32, "mean": MEAN, "std": STD,
            "recipe": None}  # fmt: skip
    (out / "run" / "checkpoints").mkdir(parents=True)
    dino = out / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {**{f"teacher_backbone.{k}": v for k, v in teacher.items()},
                               **{f"student_backbone.{k}": v for k, v in student.items()}},
                "xcit_ssl": {**meta, "method": "dino"}}, dino)  # fmt: skip
    sup = out / "sup.ckpt"
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in student.items()},
                               **{f"ema_backbone.{k}": v for k, v in student.items()}},
                "xcit_ssl": {**meta, "method": "supervised"}}, sup)  # fmt: skip
    export = out / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.items()}, str(export),
              metadata={"xcit_ssl": json.dumps({**meta, "name": NAME, "overrides": OVERRIDES})})  # fmt: skip
    return {"dino": dino, "sup": sup, "export": export}


def test_protocols_ship_and_resolve() -> None:
    assert {"knn_imagenet", "knn_fmnist", "linear_imagenet", "linear_fmnist"} <= {n for n, _ in list_protocols()}
    assert protocol_path("knn_fmnist").name == "knn_fmnist.yaml"
    with pytest.raises(UserError, match="unknown protocol 'knn_imagenette'.*Closest: knn_imagenet"):
        protocol_path("knn_imagenette")
    with pytest.raises(UserError, match="protocol file .*missing.yaml' does not exist"):
        protocol_path("some/missing.yaml")


def test_knn_end_to_end_teacher_cache_and_student(folder: Path, weights: dict[str, Path], capsys) -> None:
    args = ["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *SMALL,
            "--features.mean", "null", "--features.std", "null", "--knn.ks", "[5, 20, 100]"]  # fmt: skip
    assert knn_main(args) == 0
    out = weights["dino"].parent.parent / "eval" / "knn_imagenet_last.json"
    result = json.loads(out.read_text())
    assert "top-1" in capsys.readouterr().out  # the table
    assert result["protocol"] == "knn_imagenet"
    assert result["weights"]["sha256"] == hashlib.sha256(weights["dino"].read_bytes()).hexdigest()
    assert result["protocol_config"]["features"]["mean"] == MEAN  # null -> the checkpoint's statistics
    assert result["num_train"] == 30 and result["num_test"] == 12
    assert result["results"]["100"]["k_used"] == 30
    assert not result["timing"]["train_cache_hit"]

    # independent pipeline: teacher weights, the transform, features by hand, same numbers
    model = create_backbone(NAME, num_classes=0, **OVERRIDES)
    sd = torch.load(weights["dino"])["state_dict"]
    model.load_state_dict({k[len("teacher_backbone.") :]: v for k, v in sd.items() if k.startswith("teacher_")})
    model.eval()
    tf = build_feature_transform(32, 32, MEAN, STD, "bicubic")

    def embed(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = sorted((folder / split).glob("*/*.png"))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            return model.forward_features(x)[:, 0], torch.tensor([CLASSES.index(f.parent.name) for f in files])

    ref = knn_evaluate(*embed("train"), *embed("val"), ks=(5, 20, 100))
    for k in (5, 20, 100):
        assert result["results"][str(k)]["top1"] == pytest.approx(ref.top1[k])

    # second run: features come from the cache, same numbers
    assert knn_main(args) == 0
    again = json.loads(out.read_text())
    assert again["timing"]["train_cache_hit"] and again["timing"]["val_cache_hit"]
    assert again["results"] == result["results"]
    cache = weights["dino"].parent.parent / "eval" / "feature_cache"
    assert len(list(cache.glob("*.safetensors"))) == 2

    # the student is a different network: new cache entries, its own JSON by default, the teacher's kept
    assert knn_main([*args, "--checkpoint_key", "student"]) == 0
    student_out = out.parent / "knn_imagenet_last_student.json"
    assert json.loads(student_out.read_text())["weights"]["checkpoint_key"] == "student"
    assert json.loads(out.read_text())["weights"]["checkpoint_key"] == "teacher"
    assert len(list(cache.glob("*.safetensors"))) == 4
    # another feature of the same weights: its own file too (the demo's CLS and cls+pyramid3 side by side)
    assert knn_main([*args, "--features.pooling", "cls+mean_patch"]) == 0
    assert json.loads((out.parent / "knn_imagenet_last_cls+mean_patch.json").read_text())[
        "protocol_config"]["features"]["pooling"] == "cls+mean_patch"
    assert json.loads(out.read_text())["protocol_config"]["features"]["pooling"] == "cls"


def test_knn_fmnist_protocol_on_exported_backbone(weights: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fm.json"
    args = ["--protocol", "knn_fmnist", "--weights", str(weights["export"]), "--data.n_train", "300",
            "--data.n_val", "60", "--out", str(out), "--no_cache", "true", "--num_workers", "0",
            "--progress", "false", "--device", "cpu"]  # fmt: skip
    assert knn_main(args) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "knn_fmnist" and result["num_train"] == 300 and result["num_test"] == 60
    assert result["protocol_config"]["data"]["pad_to"] == 32
    assert set(result["results"]) == {"10", "20", "100", "200"}
    assert result["results"]["20"]["top1"] > 30.0  # random tiny backbone, 10 classes: well above 10 % chance


def test_linear_fast_and_protocol(folder: Path, weights: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *SMALL,
              "--cache_dir", str(tmp_path / "cache"), "--linear.epochs", "2", "--linear.batch_size", "16"]  # fmt: skip
    assert linear_main([*common, "--linear.fast", "true", "--out", str(tmp_path / "fast.json")]) == 0
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["variant"] == "linear_fast" and "not the DINO protocol" in fast["variant_note"]
    assert fast["results"]["epochs_evaluated"] == 2 and 0.0 <= fast["results"]["top1"] <= 100.0
    # with an lr sweep: candidates scored on held-out training images, the chosen lr recorded and printed
    sweep_args = ["--linear.fast", "true", "--linear.lr_sweep", "[0.001, 1.0]", "--linear.sweep_holdout", "0.2"]
    assert linear_main([*common, *sweep_args, "--out", str(tmp_path / "sweep.json")]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())["lr_sweep"]
    assert [c["base_lr"] for c in sweep["candidates"]] == [0.001, 1.0] and sweep["holdout_images"] == 6  # 20 % of 30
    assert sweep["chosen_base_lr"] == max(sweep["candidates"], key=lambda c: (c["holdout_top1"], -c["base_lr"]))["base_lr"]
    assert f"base_lr {sweep['chosen_base_lr']:g} from the sweep" in capsys.readouterr().out.replace("\n", " ")
    with pytest.raises(UserError, match="--linear.lr_sweep"):
        linear_main([*common, "--linear.fast", "true", "--linear.lr_sweep", "[0.0, 1.0]", "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()
    assert linear_main([*common, "--out", str(tmp_path / "probe.json")]) == 0
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["variant"] == "linear" and probe["results"]["epochs_evaluated"] == 2
    assert probe["protocol_config"]["linear"]["base_lr"] == 1e-3
    assert len(probe["results"]["curve"]["top1"]) == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_split", "does not exist"),
        ("no_classes", "no class sub-folders"),
        ("no_teacher", "none is 'teacher'"),
        ("mismatch", "xcit_small_12"),
        ("no_weights", "no weights given"),
        ("missing_file", "not found"),
        ("bad_crop", "multiple of the backbone's patch size"),
    ],
)
def test_user_errors(case: str, message: str, folder: Path, weights: dict[str, Path], tmp_path: Path) -> None:
    root, ckpt = folder, ["--checkpoint", str(weights["dino"])]
    extra: list[str] = []
    if case == "missing_split":
        extra = ["--data.val_split", "validation"]
    elif case == "no_classes":
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
        root = tmp_path
    elif case == "no_teacher":
        ckpt = ["--checkpoint", str(weights["sup"])]
    elif case == "mismatch":
        ckpt = ["--weights", str(weights["export"]), "--backbone", "xcit_small_12_p16_224"]
    elif case == "no_weights":
        ckpt = []
    elif case == "missing_file":
        ckpt = ["--checkpoint", str(tmp_path / "nope.ckpt")]
    elif case == "bad_crop":
        extra = ["--features.crop_size", "40", "--features.resize_size", "40"]
    args = [*ckpt, "--data.root", str(root), *SMALL, *extra, "--out", str(tmp_path / "r.json")]
    with pytest.raises(UserError, match=message):
        knn_main(args)
    assert not (tmp_path / "r.json").exists()  # nothing half-written
