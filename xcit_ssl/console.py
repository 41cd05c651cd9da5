"""What the console shows: third-party notices filtered at our boundary, tables that fit the terminal.

Our libraries print things a user of ``xcit-ssl`` cannot act on: deprecation notices about their
own internals, advertisements, lines about hardware the machine does not have. They are dropped
here, each by its own message, while the CLI runs (:func:`quiet_third_party`); every other
warning and log line passes. Nothing is silenced globally or for library users.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# (message regex, why it is noise for an xcit-ssl user); matched at the start of the message
NOISY_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch deprecation inside Lightning's own code"),
    (r"'set_vital' is deprecated", "torch deprecation inside torchdata's StatefulDataLoader"),
    (r"You passed in a `val_dataloader` but have no `validation_step`",
     "DINO has no validation step: the labelled split serves the evaluation callbacks"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     "a run always logs its last step (runs/loggers.py LogLastStep)"),
)  # fmt: skip

# logger name -> message regexes dropped from it (Lightning logs these through `rank_zero_info`)
NOISY_LOG_LINES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"💡 Tip",  # advertisements for Lightning's cloud services
        r"(TPU|HPU) available: False",  # hardware the machine does not have
        r"Loading `train_dataloader` to estimate number of stepping batches",
    ),
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (
        r"`weights_only` was not set",  # our checkpoints load with weights_only=True (fit.py)
    ),
    "matplotlib.font_manager": (r"generated new fontManager",),  # a first-import cache note
}


class _DropMatching(logging.Filter):
    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self._patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self._patterns)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Drop the notices of :data:`NOISY_WARNINGS` and :data:`NOISY_LOG_LINES` inside the block."""
    installed: list[tuple[logging.Logger, logging.Filter]] = []
    with warnings.catch_warnings():
        for pattern, _why in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for name, patterns in NOISY_LOG_LINES.items():
            lib_logger, drop = logging.getLogger(name), _DropMatching(patterns)
            lib_logger.addFilter(drop)
            installed.append((lib_logger, drop))
        try:
            yield
        finally:
            for lib_logger, drop in installed:
                lib_logger.removeFilter(drop)


def terminal_width(fallback: int = 100) -> int:
    """Columns of the terminal: ``$COLUMNS`` if set, the tty's width, else ``fallback`` (pipes, files)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((fallback, 24)).columns
    return fallback


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], wrap: Sequence[str] = ()) -> None:
    """A rich table as wide as the terminal (:func:`terminal_width`). Cells wrap at word boundaries
    and are never cut or truncated: each column is at least as wide as its longest word (the first
    column, the names, as its longest cell). Columns named in ``wrap`` take the room that is left."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    cells = [[str(v) for v in row] for row in rows]
    table = Table(title=title)
    for i, col in enumerate(columns):
        pieces = [row[i] for row in cells] if i == 0 else [w for row in cells for w in row[i].split()]
        longest = max((len(p) for p in pieces + col.split()), default=1)
        justify = "left" if i == 0 or col in wrap else "right"
        table.add_column(col, justify=justify, no_wrap=i == 0, min_width=longest, ratio=1 if col in wrap else None)
    for row in cells:
        table.add_row(*row)
    # narrower than the table's words: the lines run on and the terminal wraps them; nothing is cropped
    Console(width=terminal_width()).print(table, crop=False)
