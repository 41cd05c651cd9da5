"""What ``xcit-ssl knn`` and ``xcit-ssl linear`` print: table rows and footnotes made from the results
(the commands hand them to :func:`xcit_ssl.console.print_table`).

An accuracy that is not reported (top-5 with 5 classes or fewer) shows as ``-``, and the footnotes
say why; the linear table leads with its headline, the last epoch, and labels best-on-val a diagnostic.
"""

from __future__ import annotations

from typing import Any

from .knn import KNNResult
from .linear import BEST_ON_VAL_NOTE

KNN_HEADERS = ("k", "k used", "top-1 %", "top-5 %")
LINEAR_HEADERS = ("", "top-1 %", "top-5 %", "epoch")


def percent_cell(value: float | None) -> str:
    """An accuracy in percent as a table cell: two decimals, ``-`` where it is not reported."""
    return "-" if value is None else f"{value:.2f}"


def knn_rows(result: KNNResult) -> list[list[str]]:
    """One row per k (:data:`KNN_HEADERS`): k, the k used, top-1 %, top-5 %."""
    return [[str(k), str(result.k_used[k]), percent_cell(result.top1[k]), percent_cell(result.top5[k])]
            for k in result.top1]  # fmt: skip


def knn_notes(result: KNNResult) -> list[str]:
    """Footnote lines of the k-NN table (why top-5 shows ``-``), empty when there is nothing to say."""
    return list(result.notes)


def linear_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The headline (last epoch), then best-on-val labelled a diagnostic (:data:`LINEAR_HEADERS`), from
    :meth:`~.linear.ProbeHistory.summary` or a result file's ``results``."""
    best = summary["best_on_val"]
    return [
        ["last epoch (headline)", percent_cell(summary["top1"]), percent_cell(summary["top5"]), str(summary["epoch"])],
        ["best on val (diagnostic)", percent_cell(best["top1"]), percent_cell(best["top5"]), str(best["epoch"])],
    ]


def linear_notes(summary: dict[str, Any]) -> list[str]:
    """Footnote lines of the linear table: what best-on-val is, then the result's warnings (too few
    optimiser steps per epoch, no top-5 with few classes)."""
    return [f"best on val is {BEST_ON_VAL_NOTE}", *summary.get("notes", [])]
