"""``xcit-ssl export --format hub``: the folder loads in timm (``local-dir:`` and ``hf-hub:``) strictly
with the checkpoint's features, rebuilds the reduced network from config.json alone, carries a card
with the results measured on exactly these weights, and bad input leaves nothing written.

The checkpoint is a real one: ``xcit-ssl fit`` on the demo recipe's network (XCiT-N12/8 cut to 3
blocks, 32 px) for two steps on an ImageNet-layout folder of Fashion-MNIST images, then evaluated
with ``xcit-ssl knn`` (teacher and, as other weights, student) and ``xcit-ssl linear --linear.fast``.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from xcit_ssl import files
from xcit_ssl.cli import main
from xcit_ssl.errors import UserError
from xcit_ssl.export import export_hub
from xcit_ssl.export import hub as hub_mod

FMNIST = Path("/usr/share/datasets/fashion-mnist")
NAME, DEPTH, SIZE = "xcit_nano_12_p8_224", 3, 32
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 4
QUIET = ["--num_workers", "0", "--progress", "false", "--device", "cpu", "--batch_size", "16"]


def _image_folder(root: Path) -> Path:
    """root/{train,val}/class_<c>/*.png|JPEG: real Fashion-MNIST images at 32 px."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for split, offset, n in (("train", 0, TRAIN_PER_CLASS), ("val", 5000, VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(labels[offset:] == c)[:n] + offset):
                Image.fromarray(images[i]).convert("RGB").resize((SIZE, SIZE)).save(folder / f"{i}.{'png' if j % 2 else 'JPEG'}")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fitted and evaluated run: {"ckpt", "data", "eval"}."""
    tmp = tmp_path_factory.mktemp("hub")
    data = _image_folder(tmp / "images")
    recipe = yaml.safe_load(Path("recipes/dino_nano_fmnist.yaml").read_text())
    model = recipe["model"]["init_args"]
    assert model["backbone"]["init_args"] == {"name": NAME, "depth": DEPTH, "img_size": SIZE}  # the demo's network
    model["dino"].update(out_dim=64, hidden_dim=32, bottleneck_dim=16, momentum_teacher=0.5)  # teacher != student
    recipe["data"]["init_args"].update(dataset="imagefolder", root=str(data), batch_size=4, num_workers=0, pad_to=None)
    recipe["trainer"].update(max_epochs=1, limit_train_batches=2, enable_model_summary=False, log_every_n_steps=1)
    recipe["trainer"]["callbacks"] = []
    (tmp / "tiny_demo.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--recipe", str(tmp / "tiny_demo.yaml"), "--run_dir", str(tmp / "runs" / "demo")]) == 0
    ckpt = tmp / "runs" / "demo" / "checkpoints" / "last.ckpt"
    on_folder = ["--data.dataset", "imagefolder", "--data.root", str(data), "--data.val_split", "val",
                 "--data.pad_to", "null", "--features.resize_size", "32", "--features.crop_size", "32", *QUIET]  # fmt: skip
    knn = ["knn", "--protocol", "knn_fmnist", "--checkpoint", str(ckpt), "--knn.ks", "[5, 10]", *on_folder]
    assert main(knn) == 0
    # the student: other weights of the same file, its result beside the teacher's and newer
    assert main([*knn, "--checkpoint_key", "student", "--out", str(ckpt.parent.parent / "eval" / "knn_student.json")]) == 0
    assert main(["linear", "--protocol", "linear_fmnist", "--checkpoint", str(ckpt), "--linear.fast", "true",
                 "--linear.epochs", "2", "--linear.lr_sweep", "[]", *on_folder]) == 0  # fmt: skip
    return {"ckpt": ckpt, "data": data, "eval": ckpt.parent.parent / "eval"}


@pytest.fixture(scope="module")
def exported(run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "xcit-nano-dino"
    assert main(["export", "--checkpoint", str(run["ckpt"]), "--format", "hub", "--out", str(out),
                 "--repo_id", "jane/xcit-nano-dino"]) == 0  # fmt: skip
    return out


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _checkpoint_backbone(ckpt: Path, key: str = "teacher") -> torch.nn.Module:
    """The checkpoint's network built by timm from the raw state dict (not through xcit-ssl's loader)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = f"{key}_backbone."
    model = timm.create_model(NAME, pretrained=False, num_classes=0, depth=DEPTH, img_size=SIZE)
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model.eval()


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _result(run: dict[str, Path], name: str) -> dict:
    return json.loads((run["eval"] / name).read_text())


def test_local_dir_loads_strictly_with_the_teachers_features(run, exported) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    # strict: every tensor of the model came from the file, and the file holds nothing else
    assert set(model.state_dict()) == set(load_file(str(exported / "model.safetensors")))
    # the reduced network rebuilt from config.json alone: 3 blocks, nano width, headless
    assert len(model.blocks) == DEPTH and model.num_features == 128 and model.num_classes == 0
    x = _images(3, 3, SIZE, SIZE)
    teacher = _checkpoint_backbone(run["ckpt"])
    torch.testing.assert_close(_features(model, x), _features(teacher, x), atol=1e-5, rtol=1e-5)
    # the check can fail: the student of the same checkpoint gives other features
    assert (_features(_checkpoint_backbone(run["ckpt"], "student"), x) - _features(model, x)).abs().max() > 1e-3


def test_config_is_timms_and_describes_these_weights(run, exported) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 0 and config["num_features"] == 128
    assert config["model_args"]["depth"] == DEPTH and config["model_args"]["img_size"] == [SIZE, SIZE]
    cfg = config["pretrained_cfg"]
    record = torch.load(run["ckpt"], map_location="cpu", weights_only=True)["xcit_ssl"]
    assert cfg["mean"] == pytest.approx(record["mean"]) and cfg["std"] == pytest.approx(record["std"])
    assert cfg["input_size"] == [3, SIZE, SIZE]
    # the evaluation transform the card's results used: resize 32 -> crop 32, bicubic
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    # timm's variant describes Facebook's ImageNet weights (tag fb_in1k, their license): not these
    assert "tag" not in cfg and "license" not in cfg
    # timm reads it back as such: what a user's transform gets
    data = timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{exported}", pretrained=False))
    assert data["input_size"] == (3, SIZE, SIZE) and list(data["mean"]) == pytest.approx(record["mean"])


def test_hf_hub_name_loads_the_uploaded_folder(exported, monkeypatch) -> None:
    """After ``hf upload jane/xcit-nano-dino DIR`` the Hub serves the folder's files: served from it here."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import EntryNotFoundError

    import timm.models._hub as timm_hub

    asked = []

    def download(repo_id: str, filename: str, **_: object) -> str:
        asked.append((repo_id, filename))
        if not (exported / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(exported / filename)

    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    model = timm.create_model("hf-hub:jane/xcit-nano-dino", pretrained=True)
    assert ("jane/xcit-nano-dino", "config.json") in asked and ("jane/xcit-nano-dino", "model.safetensors") in asked
    x = _images(2, 3, SIZE, SIZE)
    local = timm.create_model(f"local-dir:{exported}", pretrained=True)
    torch.testing.assert_close(_features(model, x), _features(local, x), atol=0, rtol=0)


def test_card_holds_the_results_of_these_weights_and_no_others(run, exported) -> None:
    card = (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and "timm" in front["tags"] and "license" not in front
    knn, student = _result(run, "knn_fmnist_last.json"), _result(run, "knn_student.json")
    assert knn["weights"]["checkpoint_key"] == "teacher" and student["weights"]["checkpoint_key"] == "student"
    linear = _result(run, "linear_fmnist_fast_last.json")
    k10 = knn["results"]["10"]  # the evaluated k closest to the headline 20
    rows = [ln for ln in card.splitlines() if ln.startswith("| knn_fmnist")]
    assert len(rows) == 1, rows  # the teacher's k-NN only, not the student's
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == f"{knn['num_train']} / {knn['num_test']}" == f"{3 * TRAIN_PER_CLASS} / {3 * VAL_PER_CLASS}"
    assert cells[3] == str(CLASSES) and cells[4].startswith("cls, 32→32 px bicubic") and cells[5] == "10"
    assert cells[7] == f"{k10['top1']:.2f}" and str(run["data"]) in cells[1]
    (lin_row,) = [ln for ln in card.splitlines() if ln.startswith("| linear_fmnist")]
    lin_cells = [c.strip() for c in lin_row.strip("|").split("|")]
    assert lin_cells[5:8] == ["linear_fast", "2", f"{linear['results']['top1']:.2f}"]
    assert "knn_student.json" not in card and "`knn_fmnist_last.json`" in card


def test_card_says_what_the_run_trained_on(run, exported) -> None:
    card = (exported / "README.md").read_text()
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    assert f"`{NAME}` (timm), overrides depth={DEPTH}" in card
    assert f"imagefolder at `{run['data']}`, split `train`, {CLASSES * TRAIN_PER_CLASS} images" in card
    assert f"**Training length:** {ckpt['global_step']} optimizer steps" in card and ckpt["global_step"] == 2
    assert "**Recipe:** tiny_demo" in card and "teacher network" in card
    assert 'timm.create_model("hf-hub:jane/xcit-nano-dino", pretrained=True)' in card
    assert "hf upload jane/xcit-nano-dino" in card and "local-dir:" in card


def test_results_of_other_weights_stay_out(run, tmp_path) -> None:
    ckpt = run["ckpt"]
    other = dict(_result(run, "knn_fmnist_last.json"))
    other["weights"] = {**other["weights"], "sha256": "0" * 64}
    other["results"] = {"10": {"top1": 12.34, "top5": 56.78}}
    (run["eval"] / "knn_other_weights.json").write_text(json.dumps(other))
    try:
        report = export_hub(ckpt, tmp_path / "hub")
    finally:
        (run["eval"] / "knn_other_weights.json").unlink()
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "12.34" not in card and "knn_other_weights" not in card
    assert len(report.export.metadata["knn"]) == 1
    # a copy of the checkpoint in a run folder without evaluations: the card says there is none
    copy = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(ckpt, copy)
    export_hub(copy, tmp_path / "hub2", license="apache-2.0")
    card = (tmp_path / "hub2" / "README.md").read_text()
    assert "No k-NN or linear-probe result of these weights" in card and "| knn_fmnist" not in card
    assert "license: apache-2.0" in card.split("---")[1]
    assert json.loads((tmp_path / "hub2" / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if files.TMP_MARK in p.name]


def test_existing_folder_is_refused_unless_overwrite(run, exported, tmp_path, capsys) -> None:
    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    args = ["export", "--checkpoint", str(run["ckpt"]), "--format", "hub", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds notes.txt" in err and "--overwrite" in err and "Traceback" not in err
    assert main([*args, "--overwrite"]) == 2  # a folder with other files is not an export to replace
    assert "holds files an export does not write (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    # an earlier export is replaced with --overwrite, as one folder, and no temporary is left
    (out / "notes.txt").unlink()
    shutil.copytree(exported, out, dirs_exist_ok=True)
    (out / "README.md").write_text("old card")
    assert main(args) == 2 and (out / "README.md").read_text() == "old card"
    assert main([*args, "--overwrite"]) == 0
    assert (out / "README.md").read_text().startswith("---") and _leftovers(tmp_path) == []
    # an empty folder is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert main([*args[:-1], str(tmp_path / "empty")]) == 0 and (tmp_path / "empty" / "config.json").is_file()


def test_failed_timm_check_writes_nothing(run, exported, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hub_mod, "TOLERANCE", -1.0)  # any difference (even 0) now fails the check
    with pytest.raises(UserError, match="nothing was written"):
        export_hub(run["ckpt"], tmp_path / "hub")
    assert list(tmp_path.iterdir()) == []
    # with --overwrite the earlier export stays as it was
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(UserError, match="nothing was written"):
        export_hub(run["ckpt"], old, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing_checkpoint", "out_is_a_file", "out_names_a_file", "layout", "license",
                                  "license_without_hub", "repo_id"])  # fmt: skip
def test_bad_input_gives_one_message_and_exit_code_2(run, tmp_path, capsys, case: str) -> None:
    out = tmp_path / "hub"
    args = ["export", "--checkpoint", str(run["ckpt"]), "--format", "hub", "--out", str(out)]
    expected = {
        "missing_checkpoint": "checkpoint not found", "out_is_a_file": "is a file; --format hub writes a folder",
        "layout": "--layout official: --format hub writes timm's keys", "license": "is not a Hub license identifier",
        "license_without_hub": "add --format hub, or drop them", "repo_id": "is not a Hub repository id",
        "out_names_a_file": "names a .safetensors file, but --format hub writes a folder",
    }[case]  # fmt: skip
    if case == "missing_checkpoint":
        args[2] = str(tmp_path / "nope.ckpt")
    elif case == "out_is_a_file":
        out.write_text("x")
    elif case == "out_names_a_file":
        args[-1] = str(tmp_path / "backbone.safetensors")
    elif case == "layout":
        args += ["--layout", "official"]
    elif case == "license":
        args += ["--license", "Apache 2.0"]
    elif case == "license_without_hub":
        args = ["export", "--checkpoint", str(run["ckpt"]), "--out", str(tmp_path / "b.safetensors"), "--license", "mit"]
    else:
        args += ["--repo_id", "no-slash"]
    assert main(args) == 2
    err = capsys.readouterr().err
    problems = [ln for ln in err.splitlines() if not ln.startswith(("INFO ", "  note:"))]
    assert len(problems) == 1 and problems[0].startswith("xcit-ssl export: error:"), err
    assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["hub"] if case == "out_is_a_file" else [])


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "folder"
    with files.atomic_dir(target) as tmp:
        files.write_text(tmp / "a.txt", "one")
    assert (target / "a.txt").read_text() == "one" and oct(target.stat().st_mode & 0o777) != oct(0o700)
    with pytest.raises(RuntimeError), files.atomic_dir(target, replace=True) as tmp:
        files.write_text(tmp / "a.txt", "two")
        raise RuntimeError("the writer failed")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "one"
    with pytest.raises(files.OutputError, match="nothing was replaced"), files.atomic_dir(target) as tmp:
        files.write_text(tmp / "b.txt", "two")  # replace=False: a folder with files stays
    with files.atomic_dir(target, replace=True) as tmp:
        files.write_text(tmp / "b.txt", "two")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and _leftovers(tmp_path) == []


def test_the_card_says_when_training_images_were_padded_not_resized() -> None:
    """Fashion-MNIST's 28 px images are zero-padded to 32 (`--data.pad_to`): a user feeding resized
    images would not get the features the card's numbers were measured on, so the card says it."""
    from xcit_ssl.data.datamodule import ImageDataModule
    from xcit_ssl.export.card import _train_data
    from xcit_ssl.methods.checkpointing import train_data

    padded = train_data(ImageDataModule(dataset="fashion_mnist", pad_to=32, batch_size=4, num_workers=0))
    assert padded is not None and padded["pad_to"] == 32 and padded["num_images"] == 60000
    assert "zero-padded to 32 px (`--data.pad_to`)" in _train_data(padded)
    unpadded = dict(padded)
    unpadded.pop("pad_to")
    assert "padded" not in _train_data(unpadded)
