"""Metrics written into the run folder (``metrics.csv``, TensorBoard events), continued on resume.

Lightning's CSV logger deletes ``metrics.csv`` whenever its folder is not empty (every run folder
holds ``config.yaml``), so a resumed run would replace its history. :class:`RunCSVLogger` keeps
the rows of the steps that the checkpoint being resumed had trained (rows of later steps are
re-logged by the resumed run; for a checkpoint written at an epoch end, also that epoch's
end-of-epoch rows) and appends. TensorBoard's ``purge_step``
hides the events after the resumed step in the same way.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ..files import as_output_error, atomic_path


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed history continues: ``step`` optimizer steps done; ``epoch`` ended if ``epoch_end``."""

    step: int
    epoch: int = 0
    epoch_end: bool = False

    def keeps(self, row: dict[str, str]) -> bool:
        """Whether a metrics row was logged before the checkpoint (so the resumed run will not log it again)."""
        try:
            step = int(float(row.get("step") or 0))
            epoch = int(float(row.get("epoch") or -1)) if row.get("epoch") else None
        except ValueError:
            return True
        if step < self.step:
            return True
        # end-of-epoch rows carry the epoch's last step count; batch rows of the next epoch do too
        return self.epoch_end and step == self.step and epoch == self.epoch and not row.get("train/loss")


def truncate_csv(path: Path, point: ResumePoint) -> list[str]:
    """Keep the header and the rows ``point`` keeps of ``path`` (atomically); return the header."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        kept = [row for row in reader if point.keeps(dict(zip(header, row)))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(kept)
    return header


class _ContinuingWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv`` after dropping the rows logged after ``resume``."""

    def __init__(self, log_dir: str, resume: ResumePoint | None) -> None:
        self._resume = resume
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume is None:  # a fresh run in a fresh folder never gets here; be safe anyway
            path.replace(path.with_name("metrics.previous.csv"))
            return
        self.metrics_keys = sorted(k for k in truncate_csv(path, self._resume) if k)

    def save(self) -> None:
        """Lightning's append; on a full or read-only disk the half-appended rows are cut off (the
        file ends with the last whole row) and one :class:`~xcit_ssl.files.OutputError` says why."""
        path = Path(self.metrics_file_path)
        self._whole_bytes = path.stat().st_size if path.is_file() else 0
        try:
            super().save()
        except Exception as err:
            output_error = as_output_error(err, path)
            if output_error is None:
                raise
            if path.is_file():
                os.truncate(path, self._whole_bytes)  # shrinking needs no free space
            raise output_error from err

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """A new metric's column: Lightning rewrites the file in place, which a full disk would
        truncate; write the new file beside it and rename (the history survives a failure)."""
        path = Path(self.metrics_file_path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        self._whole_bytes = path.stat().st_size  # the append that follows starts from the new file


class RunCSVLogger(CSVLogger):
    """``<run>/metrics.csv``; ``resume`` keeps the existing history up to that point."""

    def __init__(self, save_dir: str, resume: ResumePoint | None = None) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self._resume = resume

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume)
        return self._experiment


def make_loggers(run_dir: Path, resume: ResumePoint | None = None) -> list[Any]:
    """TensorBoard and CSV metrics straight into the run folder, continuing a resumed history."""
    tb_kwargs: dict[str, Any] = {} if resume is None else {"purge_step": int(resume.step)}
    return [
        TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False, **tb_kwargs),
        RunCSVLogger(str(run_dir), resume=resume),
    ]


class LogLastStep(Callback):
    """Logs the step metrics of a run's last optimizer step, whatever ``log_every_n_steps`` is.

    Lightning logs a step only when its number is a multiple of ``log_every_n_steps``, so a run
    shorter than the interval (a 3-step check with the recipe's 50) would leave ``metrics.csv``
    without a single ``train/loss`` row, and a longer one loses its final values. For the last
    step the interval becomes 1, and is restored when training ends.
    """

    def __init__(self) -> None:
        self._every: int | None = None
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._every = trainer.log_every_n_steps
        total = trainer.estimated_stepping_batches
        self._last_step = int(total) if math.isfinite(total) and total > 0 else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._every and self._last_step is not None and trainer.global_step + 1 >= self._last_step:
            trainer.log_every_n_steps = 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._every is not None:
            trainer.log_every_n_steps = self._every
