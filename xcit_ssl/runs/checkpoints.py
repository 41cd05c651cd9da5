"""Checkpoints a multi-day run can trust: when they are written, how, and what they carry.

- :class:`AtomicCheckpointIO` writes every checkpoint through :func:`xcit_ssl.files.atomic_path`
  (a temporary file in the destination folder, fsynced and renamed over the old one), so the
  previous checkpoint stays valid until the new one is complete, whatever kills the process.
- :class:`RunCheckpoints` decides when: ``last.ckpt`` at every epoch end, every
  ``every_n_steps`` optimizer steps and every ``every_minutes`` minutes of training, and
  ``epoch_NNNN.ckpt`` every ``every_n_epochs`` epochs; on SIGTERM, SIGUSR1 or SIGINT it writes
  ``last.ckpt`` after the current optimizer step and stops the run with :class:`RunInterrupted`.
  All ranks take the same decision (one all-reduce per step); rank 0 writes. It also stores the
  RNG states of the training process, so stochastic depth after a resume draws what the
  uninterrupted run drew, and whether it was written at an epoch end (which metrics rows a
  resumed history keeps, :mod:`.loggers`).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..files import DiskFullError, atomic_link, atomic_path, needed_text, remove_stale_temporaries
from .folders import check_run_dir
from .signals import PreemptionSignals, RunInterrupted

logger = logging.getLogger(__name__)

def remove_stale_checkpoints(folder: Path) -> int:
    """Delete temporary checkpoint files a killed process left in ``folder``; returns how many."""
    removed = remove_stale_temporaries(folder)
    if removed:
        logger.info("removed %d partial checkpoint file(s) a killed run left in %s", removed, folder)
    return removed


def checkpoint_bytes(obj: Any) -> int:
    """About the size ``torch.save`` gives ``obj``: the bytes of its tensors' storages, each once."""
    seen: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(seen.values())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written atomically next to the destination (local paths).

    A full disk raises :class:`~xcit_ssl.files.DiskFullError` with the checkpoint's estimated size;
    while ``defer_disk_full`` is set (by :meth:`RunCheckpoints.save`) it is kept in ``disk_full``
    instead, so that the writing rank still reaches Lightning's barrier after the write and every
    rank can learn of it and stop together, none left waiting in a collective.
    """

    def __init__(self) -> None:
        super().__init__()
        self.defer_disk_full = False
        self.disk_full: DiskFullError | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction semantics
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path, needed=checkpoint_bytes(checkpoint)) as tmp:
                torch.save(checkpoint, tmp)
        except DiskFullError as err:
            if not self.defer_disk_full:
                raise
            self.disk_full = err


def collect_rng_states() -> dict[str, Any]:
    """torch (CPU and every CUDA device), NumPy and Python RNG states, as tensors and plain types
    (a checkpoint holding them still loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _restore_loader_position(trainer: L.Trainer, epoch_ended: bool) -> None:
    """Apply the checkpoint's data-loader state that Lightning set aside but did not apply.

    Lightning applies a ``StatefulDataLoader``'s saved state when it sets up the training data
    after restoring the loops. Our methods ask for the training set-up earlier (the schedules
    need ``estimated_stepping_batches`` in ``configure_optimizers``), so the state arrives after
    the loader was built and would be dropped: the resumed epoch would start from its first batch.
    Load it here and start the epoch's iterator again, at the saved position. A checkpoint
    written at an epoch end needs nothing: the next epoch starts at its first batch.
    """
    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    combined = getattr(fit_loop, "_combined_loader", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if not states or combined is None or fetcher is None:
        return
    fit_loop._combined_loader_states_to_load = []
    if epoch_ended or all(state.get("_iterator_finished") for state in states):
        return
    epoch = fit_loop.epoch_progress.current.processed
    for loader in combined.flattened:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    combined._load_state_dicts(states)
    iter(fetcher)


class RunCheckpoints(L.Callback):
    """``last.ckpt`` often, ``epoch_NNNN.ckpt`` periodically, and a clean stop on pre-emption.

    Args:
        dirpath: the run's ``checkpoints`` folder.
        every_n_epochs: keep ``epoch_NNNN.ckpt`` (0-based epoch index) every N epochs; 0: never.
        every_n_steps: also write ``last.ckpt`` every N optimizer steps; 0: off.
        every_minutes: also write ``last.ckpt`` when this many minutes passed since the last
            write; 0: off.
    """

    def __init__(
        self,
        dirpath: str | Path,
        every_n_epochs: int = 20,
        every_n_steps: int = 0,
        every_minutes: float = 30.0,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps), ("every_minutes", every_minutes)):
            if value < 0:
                raise ValueError(f"checkpoint {name} must be >= 0, got {value}")
        self.dirpath = Path(dirpath)
        check_run_dir(self.dirpath.parent)  # built with the trainer: before the data, the ranks, the first write
        self.every_n_epochs = int(every_n_epochs)
        self.every_n_steps = int(every_n_steps)
        self.every_seconds = float(every_minutes) * 60.0
        self.signals = PreemptionSignals()
        self._last_write = time.monotonic()
        self._seen_step: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._at_epoch_end = False
        self._resumed_at_epoch_end = False
        self._flush_next = False
        self._saved_step: int | None = None  # step of the last checkpoint this process wrote

    @property
    def state_key(self) -> str:
        return "RunCheckpoints"

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # -- lifecycle ------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.dirpath.is_dir():
            remove_stale_checkpoints(self.dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _restore_loader_position(trainer, self._resumed_at_epoch_end)
        if self._rng_to_restore is not None:  # after every loader and module was built
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._seen_step = trainer.global_step
        self._last_write = time.monotonic()
        launcher = trainer.strategy.launcher
        self.signals.install(forward=getattr(launcher, "kill", None))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.signals.restore()

    # -- decisions ------------------------------------------------------------------------------

    def _agree(self, trainer: L.Trainer, *flags: bool) -> list[bool]:
        """Element-wise OR of ``flags`` over all ranks (one small all-reduce when distributed)."""
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._flush_next:  # the rows of the step saved last were logged after its checkpoint
            self._flush_next = False
            for lg in trainer.loggers:
                lg.save()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # inside a gradient-accumulation window: no state to save yet
            return
        self._seen_step = step
        due_steps = self.every_n_steps > 0 and step % self.every_n_steps == 0
        due_time = self.every_seconds > 0 and time.monotonic() - self._last_write >= self.every_seconds
        stop, due_time = self._agree(trainer, self.signals.received is not None, due_time)
        if stop or due_steps or due_time:
            self.save(trainer, self.last_path)
            self._flush_next = True
        if stop:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._at_epoch_end = True
        try:
            self._save_epoch_end(trainer, epoch)
        finally:
            self._at_epoch_end = False
        (stop,) = self._agree(trainer, self.signals.received is not None)
        if stop:
            self._stop(trainer)

    def _save_epoch_end(self, trainer: L.Trainer, epoch: int) -> None:
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            periodic = self.dirpath / f"epoch_{epoch:04d}.ckpt"
            self.save(trainer, periodic)
            self._link_last(trainer, periodic)
        else:
            self.save(trainer, self.last_path)

    # -- writing --------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer, path: Path) -> None:
        """Flush the metrics, then write the full training state to ``path`` (collective).

        A full disk stops every rank with one :class:`DiskFullError` (exit code 74) that says what
        is left and how to go on; the previous checkpoint is untouched.
        """
        for lg in trainer.loggers:
            lg.save()
        io = trainer.strategy.checkpoint_io
        deferring = isinstance(io, AtomicCheckpointIO)
        if deferring:
            io.defer_disk_full, io.disk_full = True, None
        try:
            trainer.save_checkpoint(path)
        finally:
            if deferring:
                io.defer_disk_full = False
        failure = io.disk_full if deferring else None
        (failed,) = self._agree(trainer, failure is not None)  # the writing rank tells the others
        if failed:
            raise self._disk_full(path, failure)
        self._last_write = time.monotonic()
        self._saved_step = trainer.global_step
        logger.debug("checkpoint %s at step %d", path, trainer.global_step)

    def _disk_full(self, path: Path, failure: DiskFullError | None) -> DiskFullError:
        """The message of a checkpoint the disk could not take: folder, bytes, what is left, what next."""
        folder, run = self.dirpath, self.dirpath.parent
        if failure is None:  # another rank wrote; rank 0 prints the full message
            return DiskFullError(f"disk full writing {path} (another rank wrote it)", path, every_rank=True)
        need = needed_text(failure.needed, failure.written) or "more space needed"
        config = run / "config.yaml"
        command = f"xcit-ssl fit --config {config}" if config.is_file() else "your xcit-ssl fit command"
        if self.last_path.is_file():
            step = f" (step {self._saved_step})" if self._saved_step is not None else ""
            state = f"The previous checkpoint {self.last_path}{step} is intact"
            fix = f"then resume: {command} --ckpt_path last"
        else:
            state = "No checkpoint of this run exists yet (this was its first)"
            fix = f"then start it again: {command}"
        return DiskFullError(
            f"disk full writing the checkpoint {path.name} into {folder}: {failure.free:,} bytes free there, {need}. "
            f"{state}. Free space there (or move {run} to a larger disk), {fix}",
            path, failure.free, failure.needed, failure.written, every_rank=True,
        )  # fmt: skip

    def _link_last(self, trainer: L.Trainer, source: Path) -> None:
        """Make ``last.ckpt`` the same file as ``source`` (a hard link: no second write)."""
        # no hard links here: write it again
        linked = atomic_link(source, self.last_path) if trainer.is_global_zero else True
        (failed,) = self._agree(trainer, not linked)
        if failed:
            self.save(trainer, self.last_path)

    def _stop(self, trainer: L.Trainer) -> None:
        # the step's metrics reach the loggers after this hook, which the exception skips: log them now
        try:
            trainer._logger_connector.update_train_step_metrics()
        except Exception:  # noqa: BLE001 - Lightning internals moved: lose one row, not the run
            pass
        for lg in trainer.loggers:
            lg.save()
        name = self.signals.received_name or "a signal on another rank"
        raise RunInterrupted(
            signal_number=self.signals.received or signal.SIGTERM,
            message=(
                f"received {name} at epoch {trainer.current_epoch}, step {trainer.global_step}: saved "
                f"{self.last_path}; resume with --ckpt_path last (same --run_dir/--config) or "
                f"--ckpt_path {self.last_path}"
            ),
        )

    # -- state carried by every checkpoint --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rng": collect_rng_states(), "epoch_end": self._at_epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")
        self._resumed_at_epoch_end = bool(state_dict.get("epoch_end", False))
