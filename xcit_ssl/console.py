"""What the console shows: one log handler, third-party notices filtered at our boundary, tables.

Our libraries print things a user of ``xcit-ssl`` cannot act on: deprecation notices about their
own internals, advertisements, lines about hardware the machine does not have. They are dropped
here, each by its own message, while the CLI runs (:func:`quiet_third_party`); every other
warning and log line passes. Nothing is silenced globally or for library users.

:func:`configure_logging` installs the one stderr handler every command logs through
(``LEVEL logger: message``; in a distributed run INFO lines from rank 0 only, warnings and errors
from every rank); :func:`print_table` and :func:`print_fields` are the one way a command prints
a table.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import Any


def launcher_rank() -> int:
    """This process's global rank as torchrun, SLURM or Lightning's launcher set it (0 if none)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def _drawn_bar_class() -> Any:
    """tqdm's class while one of its bars is drawn (Lightning's, litdata's, ours), else None."""
    tqdm = sys.modules.get("tqdm")
    return tqdm.tqdm if tqdm is not None and getattr(tqdm.tqdm, "_instances", None) else None


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """INFO (and below) from rank 0 only: every rank of a run logs the same events (its data, its
        plan, the k-NN result), and rank 1 would repeat each. Warnings and errors pass on every rank
        (a rank's own unreadable file, its signal)."""
        if record.levelno < logging.WARNING and launcher_rank() > 0:
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        """While a progress bar is drawn (tqdm: Lightning's bars, ours), write through ``tqdm.write``,
        which clears the bar, prints the line and redraws it: otherwise the line is glued to the
        bar's last redraw, which has no newline (a log file, SLURM's output, a pipe)."""
        bar = _drawn_bar_class()
        if bar is None:
            super().emit(record)
            return
        try:
            bar.write(self.format(record), file=self.stream)
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
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
     "torch deprecation inside Lightning's all_gather (the online k-NN gathers features under DDP)"),
    (r"Precision \S+ is not supported by the model summary",
     "mixed precision keeps float32 weights: the summary's 32-bit size is the right one"),
    (r"It is recommended to use `self\.log\('knn/",
     "OnlineKNN all-gathers the features: every rank logs the same value, there is nothing to accumulate"),
)  # fmt: skip

# (message regex, why): said once per process, not once per place that says it (a warnings filter
# "once" cannot do it: its registry is cleared whenever any code changes the filters)
ONCE_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"This DataLoader will create \d+ worker processes in total",
     "more workers than cores: torch and torchdata say it when a loader is built and again per iterator"),
)  # fmt: skip

# logger name -> message regexes dropped from it (Lightning logs these through `rank_zero_info`)
NOISY_LOG_LINES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        r"💡 Tip",  # advertisements for Lightning's cloud services
        r"(TPU|HPU) available: False",  # hardware the machine does not have
        r"Loading `train_dataloader` to estimate number of stepping batches",
        r"-+\ndistributed_backend=",  # a banner; `Initializing distributed: ... MEMBER: 1/2` says it
    ),
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (
        r"`weights_only` was not set",  # our checkpoints load with weights_only=True (fit.py)
    ),
    "matplotlib.font_manager": (r"generated new fontManager",),  # a first-import cache note
    # said by every litdata reader opened (each split, each worker): local folders are read in place
    "litdata.streaming.dataset": (r"StreamingDataset POSIX-fast",),
    "litdata.utilities.format": (r"max_cache_size is unset",),
    # a WARNING for a normal first run; runs/trackers.py names the run and its experiment in one line
    "lightning.pytorch.loggers.mlflow": (r"Experiment with name .* not found\. Creating it",),
}


class _DropMatching(logging.Filter):
    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self._patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self._patterns)


class _ShowWarning:
    """``warnings.showwarning`` inside :func:`quiet_third_party`: a warning matching ``once`` only
    the first time its text is seen; while a progress bar is drawn, through ``tqdm.write`` (a line
    of its own, not glued to the bar's last redraw; as :class:`_CurrentStderr` does)."""

    def __init__(self, show: Any, once: Sequence[str]) -> None:
        self._show, self._once, self._seen = show, [re.compile(p) for p in once], set()

    def __call__(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:  # fmt: skip
        text = str(message)
        if any(p.match(text) for p in self._once):
            if text in self._seen:
                return
            self._seen.add(text)
        bar = _drawn_bar_class()
        if bar is None or file is not None:
            self._show(message, category, filename, lineno, file, line)
            return
        bar.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=sys.stderr)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Drop the notices of :data:`NOISY_WARNINGS` and :data:`NOISY_LOG_LINES` inside the block,
    show those of :data:`ONCE_WARNINGS` once, and every other warning on a line of its own."""
    installed: list[tuple[logging.Logger, logging.Filter]] = []
    with warnings.catch_warnings():
        for pattern, _why in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.showwarning = _ShowWarning(warnings.showwarning, [p for p, _why in ONCE_WARNINGS])
        for name, patterns in NOISY_LOG_LINES.items():
            lib_logger, drop = logging.getLogger(name), _DropMatching(patterns)
            lib_logger.addFilter(drop)
            installed.append((lib_logger, drop))
        try:
            yield
        finally:
            for lib_logger, drop in installed:
                lib_logger.removeFilter(drop)


class _LinesToLog:
    """A text stream that turns each written line into a record of ``logger`` at ``level``."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger, self._level, self._pending = logger, level, ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(self._level, "%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._logger.log(self._level, "%s", self._pending.rstrip())
        self._pending = ""

    def isatty(self) -> bool:
        return False


@contextmanager
def prints_to_debug_log(logger_name: str) -> Iterator[None]:
    """Inside the block, the lines a library prints to stdout become DEBUG records of ``logger_name``
    (hidden at our INFO level): for a library that narrates its steps and advertises with ``print``
    (litdata's ``optimize``) while its results reach us as return values and exceptions."""
    sink = _LinesToLog(logging.getLogger(logger_name), logging.DEBUG)
    try:
        with redirect_stdout(sink):  # type: ignore[type-var]
            yield
    finally:
        sink.flush()


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Inside the block the named loggers pass only records at ``level`` and above (their own level
    restored after): for work whose INFO lines are not events of the command, such as an export
    reading its own file back or a Trainer built to measure a step."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg, old in zip(loggers, levels):
        lg.setLevel(max(old, level))
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


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
