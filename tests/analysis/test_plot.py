"""``xcit-ssl plot``: one subplot per metric the run logged, from a sparse Lightning metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from xcit_ssl.analysis.plot import plot_run, read_metrics
from xcit_ssl.cli import main

COLUMNS = ["collapse/teacher_entropy", "epoch", "knn/top1", "step", "train/loss", "train/lr", "train/wd",
           "train/teacher_momentum", "train/teacher_temp", "never/logged"]  # fmt: skip


def write_run(folder: Path) -> Path:
    """A metrics.csv shaped like Lightning's: sparse rows, the epoch-end k-NN row apart."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for step in range(9, 100, 10):
            w.writerow({"step": step, "epoch": 0, "train/loss": 8 - step / 50, "train/lr": 1e-4 * step,
                        "train/wd": 0.04, "train/teacher_momentum": 0.99, "train/teacher_temp": 0.04})  # fmt: skip
            w.writerow({"step": step, "epoch": 0, "collapse/teacher_entropy": 5.0})
        w.writerow({"step": 99, "epoch": 0, "knn/top1": 71.5})
    return folder


def test_plot_draws_every_logged_metric(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    series = read_metrics(run / "metrics.csv")
    assert series["knn/top1"] == ([99.0], [71.5])
    assert series["train/loss"][0] == [float(s) for s in range(9, 100, 10)]
    out, names = plot_run(run)
    logged = sorted(c for c in COLUMNS if c not in ("epoch", "step", "never/logged"))
    assert names == logged  # every metric with a value, none of the empty column, no epoch/step
    assert out == run / "curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_plot_cli_and_bad_run_folder(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run")
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert "7 metrics ->" in capsys.readouterr().out and (tmp_path / "c.png").is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.csv not found" in capsys.readouterr().err
    assert main(["plot", str(run), "--out", str(tmp_path / "c.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "c.jpg").exists()

