"""First contact: what a user sees of `fit` (console, --help), of the listings and of data mistakes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.config import list_recipes
from xcit_ssl.errors import UserError

REPO = Path(__file__).parent.parent
# what a fit must not print: library advertisements and notices about the libraries' own internals
NOISE = ("💡", "litlogger", "LeafSpec", "set_vital", "`val_dataloader` but have no `validation_step`",
         "`weights_only` was not set", "FLOPs", "TPU available", "Previous log files", "exists and is not empty",
         "smaller than the logging interval")  # fmt: skip


def test_short_fit_prints_each_event_once_and_logs_its_metrics(tmp_path: Path) -> None:
    """A 3-step fit with log_every_n_steps 50, run as a user runs it: a quiet console, and metrics."""
    recipe_path = _tiny_recipe(tmp_path, _write_image_folder(tmp_path / "data", per_class=4))
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["trainer"].update(max_steps=3, max_epochs=1, log_every_n_steps=50)
    recipe["trainer"].pop("enable_model_summary")  # the default summary, as a recipe has it
    recipe_path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "runs" / "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), COLUMNS="100")
    proc = subprocess.run(
        [sys.executable, "-m", "xcit_ssl.cli", "fit", "--recipe", str(recipe_path), "--run_dir", str(run)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    # progress bars redraw one line with \r; every other line is an event, said once
    lines = [ln for ln in re.split(r"[\r\n]", console) if ln.strip() and not re.search(r"\d+it/s|it/s]|s/it", ln)]
    lines = [ln for ln in lines if not ln.startswith(("Epoch ", "Training"))]
    repeated = sorted({ln for ln in lines if lines.count(ln) > 1})
    assert not repeated, repeated
    assert not [n for n in NOISE if n in console], console
    assert "xcit_ssl.runs.progress: model:" in console and "trainable" in console  # the summary, without FLOPs
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    loss_rows = [row for row in metrics[1:] if row.split(",")[header.index("train/loss")]]
    assert loss_rows, metrics  # the last step is logged even though 3 < log_every_n_steps


@pytest.fixture()
def argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["xcit-ssl"])  # run_fit rewrites sys.argv for Lightning's launcher
    monkeypatch.chdir(tmp_path)  # nothing may be written: any runs/ folder would show here


def test_fit_help_opens_with_how_xcit_ssl_is_used(argv, capsys, tmp_path: Path) -> None:
    assert main(["fit", "--help"]) == 0
    first_screen = "\n".join(capsys.readouterr().out.splitlines()[:32])
    for needed in ("--recipe NAME", "xcit-ssl recipes", "--print_config", "--data.root", "--trainer.devices",
                   "--model.optim.base_lr", "--ckpt_path last", "--run_dir", "--checkpoint_every_n_epochs",
                   "--checkpoint_every_minutes", "--model.help"):  # fmt: skip
        assert needed in first_screen, needed
    assert not list(tmp_path.iterdir())


def test_fit_recipe_help_lists_that_recipes_values(argv, capsys, tmp_path: Path) -> None:
    assert main(["fit", "--recipe", "dino_nano_fmnist", "--help", "--data.batch_size", "32"]) == 0
    out = capsys.readouterr().out
    flags = dict(re.findall(r"^  (--\S+) +(.*)$", out, re.MULTILINE))
    assert flags["--model"] == "xcit_ssl.methods.dino.DINO"
    assert flags["--model.backbone.name"] == "xcit_nano_12_p8_224" and flags["--model.optim.base_lr"] == "0.002"
    assert flags["--data.dataset"] == "fashion_mnist" and flags["--data.batch_size"] == "32"  # overrides apply
    recipe = yaml.safe_load((REPO / "recipes" / "dino_nano_fmnist.yaml").read_text())
    assert flags["--trainer.max_epochs"] == str(recipe["trainer"]["max_epochs"])  # the recipe's, not Lightning's
    assert flags["--model.backbone.depth"] == "3"
    assert "--trainer.limit_train_batches" not in flags  # only what the recipe sets
    assert "--trainer.gradient_clip_algorithm" not in flags  # Lightning's defaults are not the recipe's
    assert flags["--checkpoint_every_n_epochs"] == "20"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, expected", [("--data.help", "--data.root"), ("--model.help", "--model.dino")])
def test_class_help_needs_no_recipe(argv, capsys, option: str, expected: str) -> None:
    name = {"--data.help": "ImageDataModule", "--model.help": "DINO"}[option]
    assert main(["fit", option, name]) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("columns", ["60", "100", "160"])
def test_listings_fit_the_terminal_and_keep_words_whole(monkeypatch, capsys, columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= int(columns)
    cells = " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇╋┼┬┴]", " ", out).split())
    for name, description in list_recipes():
        assert name in cells and description in cells  # every word whole, nothing truncated


def test_listing_width_without_a_terminal_is_100(monkeypatch, capsys) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["protocols"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 100


def test_folder_of_images_without_classes_names_dataset_flat(tmp_path: Path) -> None:
    from xcit_ssl.data.datasets import open_dataset

    images = _write_image_folder(tmp_path / "tree", per_class=1, classes=1) / "train" / "class_0"
    (tmp_path / "flat").mkdir()
    for image in images.iterdir():
        image.rename(tmp_path / "flat" / image.name)
    with pytest.raises(UserError, match="holds images directly.*--data.dataset flat"):
        open_dataset("imagefolder", tmp_path / "flat", "train")
    assert len(open_dataset("flat", tmp_path / "flat", None)) == 1  # the fix the message names works


def test_log_lines_during_a_progress_bar_get_lines_of_their_own(monkeypatch) -> None:
    """In a log file (no terminal) a bar redraws with \\r and no newline: a log line written while
    it is drawn (an online k-NN result, a SIGTERM warning) must not be glued to the bar."""
    import io
    import logging

    from tqdm import tqdm

    from xcit_ssl.console import _CurrentStderr

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    record = logging.LogRecord("xcit_ssl.evaluation.online", logging.INFO, __file__, 1, "epoch 1: knn/top1 77.05", None, None)
    with tqdm(total=10, file=sys.stderr, desc="Epoch 0") as bar:
        bar.update(5)
        handler.emit(record)
        bar.update(5)
    handler.emit(record)  # no bar: a plain line
    segments = [s.strip() for s in re.split(r"[\r\n]", err.getvalue()) if s.strip()]
    message = "INFO xcit_ssl.evaluation.online: epoch 1: knn/top1 77.05"
    assert segments.count(message) == 2, segments
    assert not [s for s in segments if message in s and s != message], segments
