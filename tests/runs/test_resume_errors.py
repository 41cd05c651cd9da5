"""What ``fit`` refuses before doing any work, and resuming from every file a run writes (in-process)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    recipe = _tiny_recipe(tmp, image_root)
    run = tmp / "runs" / "tiny"
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_n_epochs", "1"]) == 0
    return run


def test_ckpt_path_last_without_checkpoint_is_an_error_not_a_fresh_run(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _tiny_recipe(tmp_path, image_root)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("# a run that was killed before its first checkpoint\n")
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,4.1\n")
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(run), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "holds no checkpoints/last.ckpt" in err and "Drop --ckpt_path" in err
    assert (run / "metrics.csv").read_text() == "epoch,step,train/loss\n0,0,4.1\n"  # history untouched
    assert not (run / "checkpoints").exists()
    # no run at all under the default name either
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(tmp_path / "none"), "--ckpt_path", "last"]) == 2
    assert not (tmp_path / "none").exists()


def test_periodic_checkpoints_every_epoch_and_no_stray_files(finished_run: Path) -> None:
    ckpts = finished_run / "checkpoints"
    assert not list(ckpts.glob(".*"))  # every temporary file was renamed
    epoch0 = torch.load(ckpts / "epoch_0000.ckpt", weights_only=True)
    assert epoch0["global_step"] == 2 and epoch0["callbacks"]["RunCheckpoints"]["epoch_end"] is True


def test_resume_from_every_file_it_wrote(finished_run: Path, tmp_path: Path) -> None:
    """last, periodic and last_good checkpoints resume by path (Lightning's ckpt hyper-parameters are
    not parsed as a config), continuing the step count and the metrics history."""
    ckpts = finished_run / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"epoch_0000.ckpt", "epoch_0001.ckpt", "last.ckpt"}
    (ckpts / "last_good.ckpt").write_bytes((ckpts / "epoch_0000.ckpt").read_bytes())
    config = str(finished_run / "config.yaml")
    rows_before = (finished_run / "metrics.csv").read_text().splitlines()
    for name, end_step in (("last_good.ckpt", 4), ("epoch_0000.ckpt", 4), ("last.ckpt", 6)):
        epochs = "2" if name != "last.ckpt" else "3"
        assert main(["fit", "--config", config, "--trainer.max_epochs", epochs, "--ckpt_path", str(ckpts / name)]) == 0
        assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == end_step, name
    rows = (finished_run / "metrics.csv").read_text().splitlines()
    assert rows[:4] == rows_before[:4]  # the history of the first epoch is kept, not replaced
    with open(finished_run / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4, 5]  # each step once: rows after a checkpoint are dropped, then re-logged


def test_checkpoint_of_another_recipe_or_model_is_refused(
    finished_run: Path, tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = str(finished_run / "checkpoints" / "last.ckpt")
    other = yaml.safe_load(_tiny_recipe(tmp_path, image_root).read_text())
    other_path = tmp_path / "other_recipe.yaml"
    other_path.write_text(yaml.safe_dump(other))
    assert main(["fit", "--recipe", str(other_path), "--ckpt_path", last, "--run_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "recipe 'tiny_dino'" in err and "recipe 'other_recipe'" in err
    args = ["fit", "--config", str(finished_run / "config.yaml"), "--ckpt_path", last]
    assert main(args + ["--model.backbone.init_args.name", "xcit_tiny_12_p8_224"]) == 2
    err = capsys.readouterr().err
    assert "holds xcit_nano_12_p8_224" in err and "builds xcit_tiny_12_p8_224" in err
    assert main(args + ["--model.backbone.init_args.depth", "2"]) == 2
    assert "depth=1" in capsys.readouterr().err
    sup = Path("recipes/sup_nano_fmnist.yaml")
    assert main(["fit", "--recipe", str(sup), "--ckpt_path", last, "--run_dir", str(tmp_path / "s")]) == 2
    assert "is a dino checkpoint, the config trains supervised" in capsys.readouterr().err
    weights = tmp_path / "weights.pth"
    torch.save({"pos_embed.token_projection.weight": torch.zeros(1)}, weights)
    assert main(args[:3] + ["--ckpt_path", str(weights)]) == 2
    assert "--model.pretrained" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("o", "s"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trainer.devices", "2", "--trainer.sync_batchnorm", "true"], "--trainer.sync_batchnorm false"),
        (["--trainer.devices", "64"], "--trainer.devices"),
        (["--trainer.precision", "16-mixed"], "bf16-mixed"),
        (["--trainer.accelerator", "gpu"], "no CUDA GPU"),
    ],
)
def test_configurations_that_cannot_run_stop_before_any_folder(
    flags: list[str], message: str, tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("the refusals are for a machine without a GPU")
    run = tmp_path / "run"
    assert main(["fit", "--recipe", str(_tiny_recipe(tmp_path, image_root)), "--run_dir", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error" in ln.lower()] == [ln for ln in err.splitlines() if ln.startswith("xcit-ssl fit: error:")]
    assert not run.exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    recipe = _tiny_recipe(tmp_path, image_root)
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(run), "--data.batch_size", "1000"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not run.exists()
