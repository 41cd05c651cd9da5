"""Run folders: where a fresh run writes, which folder a resume continues, cleaning up a run that never started."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ..console import launcher_rank  # the one definition: the console prints INFO from rank 0 only
from ..files import OutputError, check_writable

logger = logging.getLogger(__name__)


def fresh_run_dir(requested: str | Path) -> Path:
    """The folder of a fresh run: ``requested``, or ``requested_N`` when that already holds a run.

    A fresh run never writes into a folder that already holds a run: ``runs/x`` becomes
    ``runs/x_1``, ``runs/x_2``... Only rank 0 chooses (and only rank 0 writes): ranks started
    later by a launcher would otherwise see rank 0's fresh folder and pick another one.
    """
    base = Path(requested)
    if launcher_rank() > 0:
        return base
    last = newest_run(base)
    if last is None:
        return base
    index = int(last.name.rsplit("_", 1)[1]) + 1 if last != base else 1
    fresh = base.parent / f"{base.name}_{index}"
    logger.warning("%s already holds a run; this run writes to %s", base, fresh)
    return fresh


def check_run_dir(folder: str | Path) -> None:
    """Refuse a run folder that cannot be written (read-only mount, no permission): one
    :class:`~xcit_ssl.files.OutputError` naming ``--run_dir`` (or its default ``runs/<recipe>``
    under the current folder), exit code 2, before the data is read or a rank started.

    Not called where the folder is chosen (:func:`fresh_run_dir`): a planner (``xcit-ssl doctor``)
    chooses it too, for a run on another machine's disks.
    """
    where = Path(folder)
    given = where if where.is_absolute() else f"{where} (in {Path.cwd()})"
    try:
        check_writable(where, "--run_dir", given)
    except OutputError as err:
        err.every_rank = True  # every rank of a torchrun/srun launch checks; rank 0 says it
        raise


def newest_run(requested: str | Path) -> Path | None:
    """The newest of ``requested``, ``requested_1``, ``requested_2``... that holds a run, or None."""
    base = Path(requested)
    siblings = [base] + sorted(
        (p for p in base.parent.glob(f"{base.name}_*") if re.fullmatch(rf"{re.escape(base.name)}_\d+", p.name)),
        key=lambda p: int(p.name.rsplit("_", 1)[1]),
    )
    existing = [p for p in siblings if holds_run(p)]
    return existing[-1] if existing else None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` is a run folder (a saved config or a checkpoints folder)."""
    return (folder / "config.yaml").exists() or (folder / "checkpoints").exists()


def remove_unstarted_run(folder: Path) -> bool:
    """Delete a run folder this invocation created when the run failed before its first step.

    Only folders without any checkpoint are removed, and only by rank 0. Returns whether it was.
    """
    if launcher_rank() > 0 or not folder.is_dir():
        return False
    if any((folder / "checkpoints").glob("*.ckpt")):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("removed %s: the run stopped before its first step", folder)
    return True
