"""What ``fit`` refuses before doing any work, and resuming from every file a run writes (in-process):
the run's global batch (refused when it changes, resumed at the same global sample when only its
split over devices and accumulation does), the folder a copied checkpoint continues in, checkpoints
of earlier versions, and what a ``--ckpt_path`` that is no training checkpoint is."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.runs.test_kill_resume import _assert_same_state
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


# ---- the run's identity: its global batch, its folder, what a --ckpt_path file is -----------------


def test_resume_with_another_global_batch_is_refused_naming_both_and_the_flag(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpts = finished_run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    metrics = (finished_run / "metrics.csv").read_text()
    args = ["fit", "--config", str(finished_run / "config.yaml"), "--ckpt_path", str(ckpts / "last.ckpt")]
    assert main(args + ["--data.batch_size", "8"]) == 2
    err = capsys.readouterr().err
    assert "global batch of 4 (1 device x 4 x accumulation 1)" in err and "8 (1 device x 8 x accumulation 1)" in err
    assert "--data.batch_size 4" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert main(args + ["--trainer.accumulate_grad_batches", "2"]) == 2
    err = capsys.readouterr().err
    assert "8 (1 device x 4 x accumulation 2)" in err and "--trainer.accumulate_grad_batches 1" in err
    # the same global batch split otherwise, but limit_train_batches (2 per process) would halve the epoch
    assert main(args + ["--data.batch_size", "2", "--trainer.accumulate_grad_batches", "2", "--trainer.max_epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "has 1 optimizer steps, the checkpoint's had 2" in err and "--trainer.limit_train_batches" in err
    assert {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")} == before
    assert (finished_run / "metrics.csv").read_text() == metrics


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory, image_root: Path) -> dict[str, Path]:
    """An uninterrupted run of 8 steps (4 an epoch) that keeps a copy of its step-6 checkpoint
    (mid-epoch 1) and records the samples of every step. Photometric augmentation in the workers
    (seeded per sample) and no drop-path: nothing depends on how a global batch is split."""
    tmp = tmp_path_factory.mktemp("paused")
    recipe = yaml.safe_load(_tiny_recipe(tmp, image_root).read_text())
    recipe["data"]["init_args"]["train_transform"]["init_args"]["photometric"] = "per_image"
    recipe["trainer"].update(limit_train_batches=None)
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests.runs.kill_helpers.RecordSamples", "init_args": {"path": str(tmp / "samples")}},
        {"class_path": "tests.runs.kill_helpers.CopyCheckpoint", "init_args": {"step": 6, "dest": str(tmp / "mid.ckpt")}},
    ]  # fmt: skip
    (tmp / "paused.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp / "run"
    assert main(["fit", "--recipe", str(tmp / "paused.yaml"), "--run_dir", str(run), "--checkpoint_every_n_steps", "2"]) == 0
    assert torch.load(tmp / "mid.ckpt", weights_only=True)["global_step"] == 6
    return {"run": run, "mid": tmp / "mid.ckpt", "samples": tmp / "samples.rank0"}


def _steps(path: Path, after: int = 0) -> dict[int, list[str]]:
    """{optimizer step: sorted sample hashes} of a RecordSamples file, steps >= ``after``."""
    steps: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        step, digest = line.split()
        if int(step) >= after:
            steps.setdefault(int(step), []).append(digest)
    return {k: sorted(v) for k, v in steps.items()}


def _resume_in_copy(paused: dict[str, Path], tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    """A copy of the paused run (its own records), and the fit arguments that resume it."""
    run = tmp_path / name
    shutil.copytree(paused["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "tests.runs.kill_helpers.RecordSamples", "init_args": {"path": str(tmp_path / f"{name}.samples")}}
    ]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, ["fit", "--config", str(run / "config.yaml"), "--run_dir", str(run)]


def test_a_copy_of_the_runs_own_checkpoint_continues_in_that_run(paused: dict[str, Path], tmp_path: Path) -> None:
    """``--run_dir runs/a --ckpt_path backup/last.ckpt`` (a copy of runs/a's checkpoint) continues
    runs/a, its checkpoints and metrics history in one folder, not a new runs/a_1."""
    run, args = _resume_in_copy(paused, tmp_path, "a")
    backup = tmp_path / "backup" / "last.ckpt"
    backup.parent.mkdir()
    shutil.copyfile(paused["mid"], backup)
    assert (run / "run_id").read_text().strip() == torch.load(backup, weights_only=True)["callbacks"]["RunRecord"]["run_id"]
    assert main(args + ["--ckpt_path", str(backup)]) == 0
    assert not (tmp_path / "a_1").exists()
    _assert_same_state(paused["run"] / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    with open(run / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(8))
    # the checkpoint of another run (another id) still starts a fresh folder beside the named one
    other, other_args = _resume_in_copy(paused, tmp_path, "b")
    (other / "run_id").write_text("another-run\n")
    assert main(other_args + ["--ckpt_path", str(backup), "--trainer.max_epochs", "2"]) == 0
    assert (tmp_path / "b_1" / "checkpoints" / "last.ckpt").is_file()


def _as_written_before(ckpt: dict) -> dict:
    """A checkpoint as the code before the run record wrote it: no RunRecord state, no split in
    the sampler's state."""
    ckpt["callbacks"].pop("RunRecord", None)

    def strip(obj: object) -> None:
        if isinstance(obj, dict):
            if {"epoch", "yielded"} <= obj.keys():
                for key in ("world_size", "batch_size", "accumulate", "position"):
                    obj.pop(key, None)
            for value in obj.values():
                strip(value)
        elif isinstance(obj, list):
            for value in obj:
                strip(value)

    strip(ckpt["loops"])
    return ckpt


def test_a_checkpoint_without_the_record_resumes_as_before(paused: dict[str, Path], tmp_path: Path) -> None:
    """No run id, no split (unknown): resumed exactly, into a fresh folder, and another batch size is
    not refused (it was not before)."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save(_as_written_before(torch.load(paused["mid"], weights_only=True)), legacy)
    run, args = _resume_in_copy(paused, tmp_path, "a")
    assert main(args + ["--ckpt_path", str(legacy)]) == 0
    fresh = tmp_path / "a_1"
    _assert_same_state(paused["run"] / "checkpoints" / "last.ckpt", fresh / "checkpoints" / "last.ckpt")
    assert _steps(tmp_path / "a.samples.rank0") == _steps(paused["samples"], after=6)
    assert main(args + ["--ckpt_path", str(legacy), "--data.batch_size", "2"]) == 0


def test_one_process_resumes_with_accumulation_at_the_same_global_sample(paused: dict[str, Path], tmp_path: Path) -> None:
    """The run trained 1 x 4; its step-6 checkpoint resumed as 1 x 2 x accumulation 2 trains the
    same samples in each remaining step (the weights differ by BatchNorm over 2 images, not 4;
    the two-process test compares weights)."""
    run, args = _resume_in_copy(paused, tmp_path, "a")
    flags = ["--data.batch_size", "2", "--trainer.accumulate_grad_batches", "2"]
    assert main(args + ["--ckpt_path", str(paused["mid"]), *flags]) == 0
    assert _steps(tmp_path / "a.samples.rank0") == _steps(paused["samples"], after=6)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["callbacks"]["RunRecord"]["accumulate"] == 2


def test_an_epoch_end_checkpoint_resumes_with_another_split(finished_run: Path, tmp_path: Path) -> None:
    """epoch_0000.ckpt (1 x 4, 2 batches an epoch) as 1 x 2 x 2: 4 micro-batches of 2 an epoch, the
    same 2 steps (``--trainer.limit_train_batches`` counts per-process micro-batches: scaled)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    args = ["fit", "--config", str(run / "config.yaml"), "--run_dir", str(run), "--data.batch_size", "2",
            "--trainer.accumulate_grad_batches", "2", "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "2"]  # fmt: skip
    assert main(args + ["--ckpt_path", str(run / "checkpoints" / "epoch_0000.ckpt")]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (4, 1)
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["completed"] == 4  # the epoch's micro-batches, not 2 (old) or 6


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated: "),
        ("text", "a text file (it begins 'epoch 3 notes: loss went down'), not a checkpoint"),
        ("lfs", "a Git LFS pointer"),
        ("empty", "an empty file (0 bytes)"),
        ("legacy", "a weight file in torch's legacy (pre-1.6) format"),
        ("safetensors", "a .safetensors weight file, not a training checkpoint"),
        ("weights", "a weight file, not a training checkpoint"),
        ("binary", "not a torch file"),
    ],
)
def test_ckpt_path_says_what_the_file_is_and_the_fix_in_one_line(
    kind: str, message: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = finished_run / "checkpoints" / "last.ckpt"
    path = tmp_path / ("weights.pth" if kind in ("legacy", "weights") else f"{kind}.ckpt")
    weights = {"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}
    if kind == "truncated":
        path.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif kind == "text":
        path.write_text("epoch 3 notes: loss went down\n")
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4567\n")
    elif kind == "empty":
        path.touch()
    elif kind == "legacy":
        torch.save(weights, path, _use_new_zipfile_serialization=False)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path))
    elif kind == "weights":
        torch.save(weights, path)
    else:
        path.write_bytes(bytes(range(256)) * 8)
    assert main(["fit", "--config", str(finished_run / "config.yaml"), "--ckpt_path", str(path)]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert line.startswith(f"xcit-ssl fit: error: --ckpt_path {path}") and message in line, err
    assert "Traceback" not in err and "mmap" not in err and "miniz" not in err
    if kind in ("legacy", "safetensors", "weights"):
        assert f"--model.pretrained {path}" in err
