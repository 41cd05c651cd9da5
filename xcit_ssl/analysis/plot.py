"""The curves of a run: every metric in ``<run>/metrics.csv``, one subplot each, against the step.

Lightning's CSV logger writes one row per logging call, so rows are sparse (a row holds the
metrics logged together) and a resumed run may repeat steps; a metric is every column other
than ``epoch`` and ``step`` that holds at least one number.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write

_INDEX_COLUMNS = ("epoch", "step")


def read_metrics(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` from a Lightning ``metrics.csv``, in file order."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path} ({err}); give a run folder with a Lightning metrics.csv") from None
    series: dict[str, tuple[list[float], list[float]]] = {}
    for n, row in enumerate(rows):
        try:
            step = float(row.get("step") or n)
        except ValueError:
            step = float(n)
        for name, text in row.items():
            if name in _INDEX_COLUMNS or name is None or text in (None, ""):
                continue
            try:
                value = float(text)
            except ValueError:
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None, ncols: int = 3) -> tuple[Path, list[str]]:
    """Draw every metric of ``run_dir/metrics.csv`` (or a CSV path) into one PNG, written atomically.

    Returns (the PNG's path, default ``<run>/curves.png``; the metrics drawn, in subplot order).
    """
    run = Path(run_dir).expanduser()
    csv_path = run if run.is_file() else run / "metrics.csv"
    if not csv_path.is_file():
        raise UserError(f"{csv_path} not found: give a run folder written by `xcit-ssl fit` (RUN_DIR/metrics.csv)")
    series = read_metrics(csv_path)
    if not series:
        raise UserError(f"{csv_path} holds no metric values yet; plot again after the run has logged a few steps")
    target = Path(out).expanduser() if out else csv_path.parent / "curves.png"
    if target.suffix.lower() != ".png":
        raise UserError(f"--out {target}: the plot is a PNG; give a path ending in .png")

    import matplotlib  # noqa: PLC0415 - lazy: plotting is the only user

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = sorted(series)
    cols = min(ncols, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        steps, values = series[name]
        style = "o-" if len(values) < 30 else "-"
        ax.plot(steps, values, style, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if "lr" in name.split("/")[-1] and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(str(csv_path.parent), fontsize=10)
    try:
        with atomic_write(target, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)
    return target, names  # the caller says what was written (the command prints it)
