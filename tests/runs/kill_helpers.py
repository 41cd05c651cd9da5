"""Callbacks the kill/resume tests load into a real ``xcit-ssl fit`` subprocess (via PYTHONPATH).

- :class:`RecordBatches` appends ``<global step after the batch> <sha1 of the batch>`` per batch:
  the batch hash covers the images (order and augmentation draws) and the labels.
- :class:`PauseAt` touches a marker file at the start of the batch after ``step`` optimizer steps
  and waits there (for a kill, or until a ``go`` file appears).
- :class:`BlockInSave` makes the ``nth`` checkpoint write hang half-written (an object in the
  checkpoint whose pickling touches a marker and sleeps), so a test can SIGKILL inside the write.
- :class:`RecordSamples` appends ``<optimizer step the sample trains in> <sha1 of the sample>`` per
  sample to ``<path>.rank<R>``: runs with other splits of one global batch compare step by step.
- :class:`CopyCheckpoint` copies ``last.ckpt`` once it holds step ``step`` (a mid-epoch checkpoint
  the run will overwrite), for a test that resumes it later.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


class RecordBatches(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        digest = hashlib.sha1()
        for t in _tensors(batch):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {digest.hexdigest()}\n")
            f.flush()
            os.fsync(f.fileno())


class PauseAt(L.Callback):
    def __init__(self, step: int, marker: str, go: str = "", timeout_s: float = 120.0) -> None:
        self.step, self.marker, self.go, self.timeout_s = step, Path(marker), Path(go) if go else None, timeout_s
        self._done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._done or trainer.global_step != self.step:
            return
        self._done = True
        self.marker.write_text(str(os.getpid()))
        end = time.monotonic() + self.timeout_s
        while time.monotonic() < end and not (self.go is not None and self.go.exists()):
            time.sleep(0.05)


class _Hang:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:  # called by torch.save while it writes the file
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(120)
        return (str, ("never",))


class BlockInSave(L.Callback):
    def __init__(self, nth: int, marker: str) -> None:
        self.nth, self.marker, self._saves = nth, marker, 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saves += 1
        if self._saves == self.nth:
            checkpoint["zz_hang"] = [torch.zeros(1 << 20), _Hang(self.marker)]


class RecordSamples(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        views, labels = batch
        views = views if isinstance(views, (list, tuple)) else [views]
        lines = []
        for i in range(labels.shape[0]):
            digest = hashlib.sha1(str(int(labels[i])).encode())
            for view in views:
                digest.update(view[i].detach().cpu().contiguous().numpy().tobytes())
            lines.append(f"{trainer.global_step} {digest.hexdigest()}\n")
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.writelines(lines)


class CopyCheckpoint(L.Callback):
    def __init__(self, step: int, dest: str) -> None:
        self.step, self.dest, self._done = step, dest, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._done and trainer.global_step == self.step and trainer.is_global_zero:
            self._done = True
            shutil.copyfile(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", self.dest)
