"""Evaluation reports what it measured: unreadable files are left out and counted once (not
replaced by neighbours), one-class data is refused, a DINO checkpoint is sent to k-NN/linear."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.evaluation.test_commands import SMALL, folder, weights  # noqa: F401 - module fixtures
from xcit_ssl.cli import main


@pytest.fixture()
def damaged(folder: Path, tmp_path: Path) -> Path:  # noqa: F811
    """The 30 + 12 image folder with one unreadable train and one unreadable val file."""
    root = tmp_path / "damaged"
    shutil.copytree(folder, root)
    (root / "train" / "bag" / "000.png").write_bytes(b"not an image")
    val = root / "val" / "sneaker" / "001.png"
    val.write_bytes(val.read_bytes()[:60])  # truncated
    return root


def test_unreadable_files_are_left_out_and_counted_once(damaged: Path, weights, tmp_path: Path, capsys) -> None:  # noqa: F811
    args = ["--checkpoint", str(weights["dino"]), "--data.root", str(damaged), *SMALL, "--no_cache"]
    assert main(["knn", *args, "--out", str(tmp_path / "knn.json"), "--knn.ks", "[5]"]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert (knn["num_train"], knn["num_test"]) == (29, 11)  # not 30 / 12 with two neighbours counted twice
    assert knn["unreadable"]["train"] == 1 and knn["unreadable"]["val"] == 1
    assert sorted(Path(p).name for p in knn["unreadable"]["files"]) == ["000.png", "001.png"]
    assert knn["data"]["root"] == str(damaged.resolve()) and knn["num_classes"] == 3
    out = capsys.readouterr()
    assert "29 train / 11 val images evaluated (2 unreadable files left out" in out.out
    assert out.err.count("left out unreadable image") == 2

    # the probe reads its training images every epoch: each bad file still counts once
    assert main(["linear", *args, "--out", str(tmp_path / "probe.json"), "--linear.epochs", "2",
                 "--linear.batch_size", "8"]) == 0  # fmt: skip
    probe = json.loads((tmp_path / "probe.json").read_text())["results"]
    assert (probe["num_train"], probe["num_val"]) == (29, 11)
    assert probe["unreadable"] == {"train": 1, "val": 1}
    assert "29 train / 11 val images evaluated (2 unreadable files left out" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["knn", "linear"])
def test_one_class_is_refused_naming_the_count(command: str, folder: Path, weights, tmp_path: Path, capsys) -> None:  # noqa: F811
    for split in ("train", "val"):
        shutil.copytree(folder / split / "bag", tmp_path / "one" / split / "bag")
    args = ["--checkpoint", str(weights["dino"]), "--data.root", str(tmp_path / "one"), *SMALL, "--no_cache"]
    assert main([command, *args, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "needs at least 2 classes" in err and "has 1 ('bag')" in err and "100 %" in err
    assert not (tmp_path / "r.json").exists()


def test_validate_sends_a_dino_checkpoint_to_knn_and_linear(folder: Path, weights, capsys) -> None:  # noqa: F811
    assert main(["validate", "--checkpoint", str(weights["dino"]), "--data.root", str(folder), "--num_workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "is a DINO checkpoint" in err and "xcit-ssl knn" in err and "xcit-ssl linear" in err
    assert "--checkpoint_key" not in err  # the first thing said is the real problem, not a key to try
