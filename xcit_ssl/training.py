"""Run machinery shared by every method: run folders, loggers, checkpoints, progress display."""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

logger = logging.getLogger(__name__)


def resolve_run_dir(requested: str | Path, resuming: bool) -> Path:
    """The run folder to use.

    A fresh run never writes into a folder that already holds a run: ``runs/x`` becomes
    ``runs/x_1``, ``runs/x_2``... When resuming, the newest existing ``runs/x[_N]`` is used.
    Only rank 0 chooses (and only rank 0 writes; Lightning broadcasts its checkpoint folder): ranks
    started later by a launcher would otherwise see rank 0's fresh folder and pick another one.
    """
    base = Path(requested)
    if _launcher_rank() > 0:
        return base
    siblings = [base] + sorted(
        (p for p in base.parent.glob(f"{base.name}_*") if re.fullmatch(rf"{re.escape(base.name)}_\d+", p.name)),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
    )
    existing = [p for p in siblings if (p / "config.yaml").exists() or (p / "checkpoints").exists()]
    if resuming:
        return existing[-1] if existing else base
    if not existing:
        return base
    last = existing[-1]
    index = int(last.name.rsplit("_", 1)[1]) + 1 if last != base else 1
    fresh = base.parent / f"{base.name}_{index}"
    logger.warning("%s already holds a run; this run writes to %s", base, fresh)
    return fresh


def _launcher_rank() -> int:
    """This process's global rank as torchrun, SLURM or Lightning's launcher set it (0 if none)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def make_loggers(run_dir: Path) -> list[Any]:
    """TensorBoard and CSV metrics written straight into the run folder."""
    return [
        TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False),
        CSVLogger(save_dir=str(run_dir), name="", version=""),
    ]


def make_callbacks(run_dir: Path, every_n_epochs: int, progress_bar: bool = True) -> list[L.Callback]:
    """``checkpoints/last.ckpt`` every epoch, ``checkpoints/epoch_NNNN.ckpt`` every N epochs, lr, progress."""
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_epochs=1),
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch_{epoch:04d}",
            auto_insert_metric_name=False,
            save_top_k=-1,
            every_n_epochs=max(1, every_n_epochs),
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    if progress_bar:
        callbacks.append(ThroughputProgressBar())
    return callbacks


class ThroughputProgressBar(TQDMProgressBar):
    """TQDM bar that also shows training images/s and the ETA of the whole run."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._start: float | None = None
        self._start_step = 0
        self._images = 0
        self._last: dict[str, str] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start, self._start_step, self._images = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_size(batch) * trainer.world_size
        if self._start is not None:
            elapsed = time.perf_counter() - self._start
            steps = trainer.global_step - self._start_step
            total = trainer.estimated_stepping_batches
            if elapsed > 0 and steps > 0:
                self._last["img/s"] = f"{self._images / elapsed:.1f}"
                if total and total != float("inf"):
                    remaining = max(0.0, (total - trainer.global_step) * elapsed / steps)
                    self._last["eta"] = str(timedelta(seconds=int(remaining)))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(self._last)
        return items


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0]) if hasattr(first, "shape") else 0
