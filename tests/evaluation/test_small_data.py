"""Evaluation on a small, few-class folder, as a user meets it (``xcit-ssl knn`` / ``linear`` /
``summary`` / ``export`` on the 3-class folder of real Fashion-MNIST PNGs of test_commands):
top-5 is not reported with 5 classes or fewer, a probe with too few steps per epoch is warned about,
the linear headline is the last epoch (best-on-val a labelled diagnostic), a k-NN result written
with ``--out`` elsewhere is still found by ``export``, and a Fashion-MNIST protocol pointed at a
folder names ``--data.pad_to null``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.evaluation.test_commands import SMALL, folder, weights  # noqa: F401 - module fixtures
from xcit_ssl.cli import main
from xcit_ssl.commands.evaluate import knn_main, linear_main
from xcit_ssl.errors import UserError
from xcit_ssl.evaluation.linear import LinearProbe

# the fast probe of the ImageNet protocol (batch 1024), 3 epochs to stay quick
FAST = ["--protocol", "linear_imagenet", "--linear.fast", "true", "--linear.epochs", "3", *SMALL]


def test_top5_is_not_reported_with_three_classes(folder: Path, weights, tmp_path: Path, capsys) -> None:  # noqa: F811
    knn_out, lin_out = tmp_path / "knn.json", tmp_path / "linear.json"
    assert knn_main(["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *SMALL, "--out", str(knn_out)]) == 0
    assert linear_main(["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *FAST, "--out", str(lin_out)]) == 0
    knn, linear = json.loads(knn_out.read_text()), json.loads(lin_out.read_text())["results"]
    assert {r["top5"] for r in knn["results"].values()} == {None}
    assert linear["top5"] is None and linear["best_on_val"]["top5"] is None and linear["curve"]["top5"] is None
    note = "top-5 not reported: with 3 classes (5 or fewer)"
    assert knn["notes"][0].startswith(note) and any(n.startswith(note) for n in linear["notes"])
    out = capsys.readouterr().out
    assert out.count(note) == 2  # the tables say why their top-5 cells show "-"
    assert re.search(r"last epoch \(headline\)\W+[\d.]+\W+-\W+3\b", out)


def test_fast_probe_with_one_step_per_epoch_warns(folder: Path, weights, tmp_path: Path, caplog) -> None:  # noqa: F811
    out = tmp_path / "linear.json"
    assert linear_main(["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *FAST, "--out", str(out)]) == 0
    warning = ("30 training images at batch 1024 make 1 optimiser step(s) per epoch (3 in all): the probe may stay "
               "near chance. On a set this small pass --linear.batch_size 3")  # fmt: skip
    assert any(r.levelname == "WARNING" and warning in r.getMessage() for r in caplog.records)
    assert json.loads(out.read_text())["results"]["notes"][0].startswith(warning)
    # with enough steps per epoch there is nothing to say
    again = tmp_path / "again.json"
    assert linear_main(["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *FAST, "--linear.batch_size",
                        "3", "--out", str(again)]) == 0  # fmt: skip
    assert not any("optimiser step" in n for n in json.loads(again.read_text())["results"]["notes"])


def test_the_protocol_probe_warns_too() -> None:
    """The Lightning probe (DINO's protocol) counts its steps per epoch from its loader."""
    x, y = torch.randn(64, 8), torch.arange(64) % 8
    probe = LinearProbe(nn.Identity(), 8, 8, epochs=1, batch_size=32)
    Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0).fit(
        probe, DataLoader(TensorDataset(x, y), 32), DataLoader(TensorDataset(x, y), 64))  # fmt: skip
    assert probe.history.notes[0].startswith("64 training images at batch 32 make 2 optimiser step(s) per epoch")
    assert probe.history.summary()["top5"] is not None  # 8 classes: top-5 means something


def test_linear_headline_is_the_last_epoch_in_the_result_and_the_summary(folder: Path, weights, tmp_path: Path,  # noqa: F811
                                                                          capsys) -> None:  # fmt: skip
    out = tmp_path / "linear.json"
    assert linear_main(["--checkpoint", str(weights["dino"]), "--data.root", str(folder), *FAST, "--linear.batch_size",
                        "3", "--linear.base_lr", "5.0", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert results["headline"] == "last epoch" and results["epoch"] == 3
    assert results["top1"] == results["curve"]["top1"][-1]
    best = results["best_on_val"]
    assert best["top1"] == max(results["curve"]["top1"]) and "not a result" in best["note"]
    assert "best_top1" not in results and "last epoch (headline)" in capsys.readouterr().out
    # summary shows the headline; a file of the old format shows its last epoch, never its best-on-val
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"command": "linear", "results": {"best_top1": 99.0, "last_top1": 41.5}}))
    assert main(["summary", "--row", "new", str(out), "--row", "old", str(old), "--out", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["linear_top1"] for r in rows] == [results["top1"], 41.5]


def test_knn_result_written_elsewhere_is_found_by_export(folder: Path, weights, tmp_path: Path, capsys) -> None:  # noqa: F811
    ckpt = weights["dino"]
    index = ckpt.parent.parent / "eval" / "results_index.json"
    index.unlink(missing_ok=True)  # the run folder is shared by this module's tests: only this result
    elsewhere = tmp_path / "results" / "knn.json"
    try:
        assert knn_main(["--checkpoint", str(ckpt), "--data.root", str(folder), *SMALL, "--out", str(elsewhere)]) == 0
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b.safetensors")]) == 0
    finally:
        index.unlink(missing_ok=True)
    out = capsys.readouterr().out
    knn_line = [line for line in out.splitlines() if line.strip("│ ").startswith("k-NN ")][-1]  # export's row
    assert "none known" not in knn_line and "top-1" in knn_line  # found, though written outside the run
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        (entry,) = json.loads(f.metadata()["xcit_ssl"])["knn"]
    assert entry["result_file"] == str(elsewhere.resolve()) and entry["top5"] is None
    assert entry["top1"] == json.loads(elsewhere.read_text())["results"]["20"]["top1"]


def test_fmnist_protocol_on_a_folder_names_pad_to_null(folder: Path, weights) -> None:  # noqa: F811
    with pytest.raises(UserError, match=r"data.pad_to=32 pads Fashion-MNIST's 28 px images only \(dataset "
                                        r"'imagefolder' given\): pass --data.pad_to null"):  # fmt: skip
        knn_main(["--protocol", "knn_fmnist", "--checkpoint", str(weights["dino"]), "--data.dataset", "imagefolder",
                  "--data.root", str(folder), *SMALL])  # fmt: skip
