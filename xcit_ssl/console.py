"""What the console shows: one log handler, third-party notices filtered at our boundary, tables.

Our libraries print things a user of ``xcit-ssl`` cannot act on: deprecation notices about their
own internals, advertisements, lines about hardware the machine does not have. They are dropped
here, each by its own message, while the CLI runs (:func:`quiet_third_party`); every other
warning and log line passes. Nothing is silenced globally or for library users.

:func:`configure_logging` installs the one stderr handler every command logs through
(``LEVEL logger: message``); :func:`print_table` and :func:`print_fields` are the one way a
command prints a table.
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

class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """While a progress bar is drawn (tqdm: Lightning's bars, ours), write through ``tqdm.write``,
        which clears the bar, prints the line and redraws it: otherwise the line is glued to the
        bar's last redraw, which has no newline (a log file, SLURM's output, a pipe)."""
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def configure_logging() -> None:
    """One INFO handler on the root logger, to the current ``sys.stderr`` (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it reports each CPU build it probes
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Route Lightning's loggers through our one handler (they add their own when imported before
    ours exists, and every INFO line would be printed twice, or to a stream that was closed)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", "torchmetrics"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if type(handler) is logging.StreamHandler:
                lib.removeHandler(handler)
        lib.propagate = True


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


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], wrap: Sequence[str] = (),
                footer: str | None = None, show_header: bool = True) -> None:  # fmt: skip
    """A rich table as wide as the terminal (:func:`terminal_width`). Cells wrap at word boundaries
    and are never cut or truncated: each column is at least as wide as its longest word (the first
    column, the names, as its longest cell). Columns named in ``wrap`` take the room that is left
    and are left-aligned, as is the first; the others (numbers) are right-aligned. A row whose first
    cell starts with ``"# "`` and whose other cells are empty opens a section with that heading.
    ``footer`` is printed under the table as plain text (soft-wrapped: paths stay whole)."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    cells = [[str(v) for v in row] for row in rows]
    # the title on one line where the terminal allows: a narrow table would wrap it
    table = Table(title=title, show_header=show_header, min_width=min(len(title) + 2, terminal_width()))
    for i, col in enumerate(columns):
        pieces = [row[i] for row in cells] if i == 0 else [w for row in cells for w in row[i].split()]
        longest = max((len(p) for p in pieces + (col.split() if show_header else [])), default=1)
        justify = "left" if i == 0 or col in wrap else "right"
        table.add_column(col, justify=justify, no_wrap=i == 0, min_width=longest, ratio=1 if col in wrap else None)
    for row in cells:
        if row[0].startswith("# ") and not any(row[1:]):
            table.add_section()
            table.add_row(f"[bold cyan]{row[0][2:]}[/]", *row[1:])
        else:
            table.add_row(*row)
    # narrower than the table's words: the lines run on and the terminal wraps them; nothing is cropped
    console = Console(width=terminal_width())
    console.print(table, crop=False)
    if footer:
        console.print(footer, soft_wrap=True, highlight=False)


def print_fields(title: str, fields: Sequence[tuple[str, object]], footer: str | None = None) -> None:
    """``label: value`` lines as a header-less two-column table (what a command wrote, a run's plan)."""
    print_table(title, ("field", "value"), fields, wrap=("value",), footer=footer, show_header=False)
