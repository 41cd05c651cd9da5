"""DataLoader workers that leave pre-emption to the training process.

SLURM signals every process of a job step (``scancel``, pre-emption, ``--signal=USR1@...``),
``kill -- -PGID`` a whole process group and Ctrl-C the terminal's foreground group, so the
DataLoader workers receive SIGTERM, SIGUSR1 or SIGINT together with the training process. Left to
their defaults they die at once (torch's worker handler re-raises SIGTERM from anyone but the
parent; SIGUSR1's default action is to terminate), and the training process, while it finishes the
step and writes ``last.ckpt`` (:mod:`xcit_ssl.runs.signals`), fails with ``DataLoader worker ... is
killed by signal`` instead: nothing saved, exit 1. :func:`worker_init` makes the workers ignore
the three signals; the training process handles them once and shuts its workers down itself (a
worker also exits when its parent is gone).
"""

from __future__ import annotations

import os
import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders a run trains and evaluates with during ``fit``.

    Ignores SIGTERM, SIGUSR1 and SIGINT in the worker, then seeds it as Lightning would have
    (``pl_worker_init_function``, which Lightning installs only where no ``worker_init_fn`` is set,
    under ``seed_everything(workers=True)``), so the workers draw what they drew before.
    """
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function  # noqa: PLC0415

        pl_worker_init_function(worker_id)
