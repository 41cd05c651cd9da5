"""Pre-emption: SIGTERM (SLURM, Kubernetes, ``docker stop``), SIGUSR1 (SLURM's warning) and SIGINT.

While training, the handlers only record the signal; :class:`~xcit_ssl.runs.checkpoints.RunCheckpoints`
writes ``last.ckpt`` after the current optimizer step and raises :class:`RunInterrupted`, which the
CLI turns into a message and the exit code ``128 + signal`` (a scheduler sees an interrupted job,
not a success). A second SIGINT stops at once (KeyboardInterrupt); a second SIGTERM during the
write changes nothing: the write is atomic and the previous checkpoint stays valid until it ends.

Under SLURM with ``--requeue``, SIGUSR1 also asks SLURM to requeue the job (Lightning's
``SLURMEnvironment`` tells whether auto-requeue is on); the requeued job resumes from
``last.ckpt`` by itself (``SLURM_RESTART_COUNT`` > 0 means ``--ckpt_path last``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..data.workers import PREEMPTION_SIGNALS

logger = logging.getLogger(__name__)

HANDLED = PREEMPTION_SIGNALS  # the three the DataLoader workers ignore, so that they are handled here once


class RunInterrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is ``128 + signal number``."""

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.signal_number = int(signal_number)
        self.exit_code = 128 + self.signal_number


class PreemptionSignals:
    """Records SIGTERM/SIGUSR1/SIGINT while installed; forwards them to launcher-started ranks."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._forward: Callable[[int], None] | None = None
        self._requeued = False

    @property
    def received_name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def install(self, forward: Callable[[int], None] | None = None) -> None:
        """Take over the three signals (main thread only); ``forward(signum)`` reaches child ranks."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None
        self._forward = forward
        for signum in HANDLED:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        first = self.received is None
        self.received = signum
        if first:
            logger.warning(
                "received %s: saving last.ckpt after the current step, then stopping", signal.Signals(signum).name
            )
            if self._forward is not None:
                try:
                    self._forward(signum)
                except Exception:  # a rank that already exited
                    pass
            if signum == signal.SIGUSR1:
                self._requeue_on_slurm()

    def _requeue_on_slurm(self) -> None:
        """``scontrol requeue`` this job when running under SLURM with auto-requeue (rank 0 only)."""
        if self._requeued or os.environ.get("SLURM_PROCID", "0") != "0":
            return
        try:
            from lightning.fabric.plugins.environments import SLURMEnvironment
        except ImportError:  # pragma: no cover
            return
        if not SLURMEnvironment.detect():
            return
        job = os.environ.get("SLURM_JOB_ID", "")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        if not re.fullmatch(r"[0-9_]+", job):
            return
        self._requeued = True
        try:
            code = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            logger.warning("SIGUSR1 under SLURM but scontrol is not on PATH: job %s is not requeued", job)
            return
        if code == 0:
            logger.warning("requeued SLURM job %s; it resumes from last.ckpt when it starts again", job)
        else:
            logger.warning("scontrol requeue %s failed (exit %d)", job, code)
