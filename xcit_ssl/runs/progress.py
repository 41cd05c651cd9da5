"""What a run shows while it trains: the model summary, and a progress bar with images/s and the ETA
of the whole run, not only of the epoch.

A run resumed mid-epoch gets no ``on_train_epoch_start`` from Lightning (the epoch had already
started), so the bar sets its epoch, total and first batch itself; a run stopped by an exception
(a pre-emption signal) ends the bar's line, so the CLI's last message starts a line of its own."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.utilities.model_summary import get_human_readable_count

logger = logging.getLogger(__name__)


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
        loop = trainer.fit_loop
        bar = self.train_progress_bar
        if getattr(loop, "restarted_mid_epoch", False) and bar is not None and not bar.disable:
            done = loop.epoch_loop.batch_progress.current.completed  # batches of this epoch already trained
            bar.reset(total=convert_inf(self.total_train_batches))
            bar.initial = bar.n = done  # tqdm's rate counts from here, not from batch 0
            bar.set_description(f"Epoch {trainer.current_epoch}")
            bar.refresh()

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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()  # ends the bar's line (leave=True keeps its last state on screen)

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


class RunModelSummary(ModelSummary):
    """The model's top-level modules with their parameter counts, as one log record.

    Lightning's summary has a FLOPs column that it fills only for modules with an
    ``example_input_array`` and otherwise prints as 0, and a train/eval mode count that says
    nothing here; ``xcit-ssl models`` has the real GFLOPs of every variant.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        rows = list(zip(columns["Name"], columns["Type"], columns["Params"]))
        name_w = max(len(r[0]) for r in rows) if rows else 4
        type_w = max(len(r[1]) for r in rows) if rows else 4
        lines = [f"  {name:<{name_w}}  {kind:<{type_w}}  {params.strip():>8}" for name, kind, params in rows]
        frozen = total_parameters - trainable_parameters
        lines.append(
            f"  {get_human_readable_count(trainable_parameters)} trainable + {get_human_readable_count(frozen)} frozen "
            f"= {get_human_readable_count(total_parameters)} parameters ({model_size:.1f} MB)"
        )
        logger.info("model:\n%s", "\n".join(lines))
