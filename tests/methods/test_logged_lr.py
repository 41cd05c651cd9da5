"""The learning rates in metrics.csv of a real ``xcit-ssl fit`` with gradient accumulation: one row
per optimizer step, equal to the schedule's formula at that step (REFERENCE.md: linear warm-up,
then a half cosine to the minimum), one column per distinct lr, no lagging monitor columns."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcit_ssl.cli import main
from xcit_ssl.data.datasets import FashionMNIST

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 2
BATCH, ACCUMULATE, EPOCHS = 4, 2, 2
STEPS_PER_EPOCH = CLASSES * TRAIN_PER_CLASS // BATCH // ACCUMULATE  # 24 images -> 6 micro-batches -> 3 steps
TOTAL = STEPS_PER_EPOCH * EPOCHS
TINY = ["--model.backbone.init_args.depth", "1", "--model.backbone.init_args.embed_dim", "32",
        "--model.backbone.init_args.num_heads", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist_folder")
    data = FashionMNIST(train=True)
    for label in range(CLASSES):
        for k, i in enumerate(np.flatnonzero(data.targets == label)[: TRAIN_PER_CLASS + VAL_PER_CLASS]):
            path = root / ("train" if k < TRAIN_PER_CLASS else "val") / f"class_{label}" / f"{k:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i]).save(path)
    return root


def _fit(recipe: str, root: Path, run: Path, *extra: str) -> list[dict[str, str]]:
    args = ["fit", "--recipe", recipe, *TINY, "--data.dataset", "imagefolder", "--data.root", str(root),
            "--data.pad_to", "null", "--data.batch_size", str(BATCH), "--data.num_workers", "0",
            "--trainer.accumulate_grad_batches", str(ACCUMULATE), "--trainer.max_epochs", str(EPOCHS),
            "--trainer.limit_train_batches", "null", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--run_dir", str(run), *extra]  # fmt: skip
    assert main(args) == 0
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _expected(peak: float, end: float, warmup: int, total: int, warmup_start: float) -> list[float]:
    """Linear warm-up from warmup_start (step 0) towards the peak (reached at step ``warmup``), then a
    half cosine from the peak to ``end`` at the last step: written out per step."""
    out = []
    for s in range(total):
        if s < warmup:
            out.append(warmup_start + (peak - warmup_start) * s / warmup)
        else:
            n = total - warmup
            out.append(end + (peak - end) * (1 + math.cos(math.pi * (s - warmup) / (n - 1))) / 2)
    return out


def _per_step(rows: list[dict[str, str]], column: str) -> dict[int, float]:
    values: dict[int, list[float]] = {}
    for row in rows:
        if row.get(column):
            values.setdefault(int(row["step"]), []).append(float(row[column]))
    assert all(len(v) == 1 for v in values.values()), f"{column} logged more than once for a step: {values}"
    return {step: v[0] for step, v in values.items()}


def test_dino_logs_the_lr_of_each_optimizer_step_once(folder: Path, tmp_path: Path) -> None:
    base_lr, min_lr = 2e-3, 1e-5
    rows = _fit("dino_nano_fmnist", folder, tmp_path / "dino",
                "--model.dino.out_dim", "64", "--model.dino.hidden_dim", "32", "--model.dino.bottleneck_dim", "16",
                "--model.optim.base_lr", str(base_lr), "--model.optim.min_lr", str(min_lr),
                "--model.optim.warmup_epochs", "1", "--model.optim.freeze_last_layer", "1")  # fmt: skip
    assert not [c for c in rows[0] if c.startswith("lr-")], "a LearningRateMonitor column is back"
    peak = base_lr * BATCH * ACCUMULATE / 256  # DINO: base_lr per 256 images of the global batch
    expected = _expected(peak, min_lr, STEPS_PER_EPOCH, TOTAL, 0.0)
    lr = _per_step(rows, "train/lr")
    assert sorted(lr) == list(range(TOTAL))
    assert [lr[s] for s in range(TOTAL)] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert lr[0] == 0.0 and lr[STEPS_PER_EPOCH] == pytest.approx(peak, rel=1e-6)  # not lagging a step
    # the last layer: frozen (lr 0) through epoch 0, then on the schedule
    last = _per_step(rows, "train/lr_last_layer")
    assert sorted(last) == list(range(TOTAL))
    assert [last[s] for s in range(TOTAL)] == pytest.approx(
        [0.0] * STEPS_PER_EPOCH + expected[STEPS_PER_EPOCH:], rel=1e-6, abs=1e-12
    )


def test_supervised_logs_one_lr_per_optimizer_step_and_no_second_name(folder: Path, tmp_path: Path) -> None:
    base_lr, min_lr, warmup_lr = 4e-3, 1e-5, 1e-6
    rows = _fit("sup_nano_fmnist", folder, tmp_path / "sup", "--model.backbone.init_args.num_classes", str(CLASSES),
                "--data.limit_val_samples", "null", "--model.optim.base_lr", str(base_lr),
                "--model.optim.min_lr", str(min_lr), "--model.optim.warmup_lr", str(warmup_lr),
                "--model.optim.warmup_epochs", "1", "--model.optim.schedule_unit", "step")  # fmt: skip
    assert [c for c in rows[0] if "lr" in c] == ["train/lr"]  # decayed and undecayed groups share it
    peak = base_lr * BATCH * ACCUMULATE / 512  # supervised: base_lr per 512 images
    lr = _per_step(rows, "train/lr")
    assert sorted(lr) == list(range(TOTAL))
    expected = _expected(peak, min_lr, STEPS_PER_EPOCH, TOTAL, warmup_lr)
    assert [lr[s] for s in range(TOTAL)] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert lr[0] == pytest.approx(warmup_lr, rel=1e-6)
