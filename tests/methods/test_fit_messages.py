"""``xcit-ssl fit`` of a demo recipe taken where it does not fit stops on a message that names the flag
to pass: a distillation recipe before its teacher exists, the Fashion-MNIST recipe pointed at shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcit_ssl.cli import main


def test_distill_recipe_without_its_teacher_names_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # as a user meets it: the demo recipe's teacher path (runs/sup_nano_fmnist/...) does not exist here
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--recipe", "distill_nano_fmnist", "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the teacher's weights runs/sup_nano_fmnist/checkpoints/last.ckpt do not exist" in err
    assert "--model.teacher_weights PATH" in err and "`xcit-ssl fit --recipe sup_nano_fmnist`" in err


def test_fmnist_recipe_on_shards_names_pad_to_null(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the recipe pads Fashion-MNIST's 28 px images to 32; shards are other images (refused before reading them)
    args = ["fit", "--recipe", "dino_nano_fmnist", "--data.dataset", "webdataset", "--data.root", str(tmp_path / "shards"),
            "--run_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.pad_to=32 pads Fashion-MNIST's 28 px images only (dataset 'webdataset' given): pass --data.pad_to null" in err
