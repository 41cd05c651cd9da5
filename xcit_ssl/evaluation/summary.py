"""The rows of ``xcit-ssl summary``: k-NN and linear-probe top-1 read from the JSON results that
``xcit-ssl knn`` / ``linear`` wrote, one labelled row per set of files.

The linear column is the probe's headline, its last epoch, for files of every version: files written
before the headline was named ``top1`` hold it as ``last_top1`` (their ``best_top1``, chosen on the
evaluation images, is not shown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def _read(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a result file of xcit-ssl knn/linear ({err}); run the evaluation first") from None


def _tokens(record: dict[str, Any]) -> str:
    """What the feature is made of: the pooling option, or ``pixels`` for ``--raw_pixels``."""
    if record.get("weights", {}).get("backbone") == "raw_pixels":
        return "pixels"
    return str(record.get("protocol_config", {}).get("features", {}).get("pooling", "cls"))


def summarize(rows: list[tuple[str, list[str]]], k: int) -> list[dict[str, Any]]:
    """``[(label, [result files])]`` -> one dict per row: k-NN top-1 at ``k``, linear top-1 (last epoch).

    A row's files may hold several features of the same weights (``--features.pooling cls`` and
    ``cls+pyramid3``): each lands in ``by_tokens[pooling]``, and the row's ``knn_top1`` /
    ``linear_top1`` / ``tokens`` are those of its first feature (the headline: DINO's protocol reads
    the CLS token, so the demo passes its CLS files first)."""
    table = []
    for label, files in rows:
        entry: dict[str, Any] = {"label": label, "knn_top1": None, "linear_top1": None, "files": files,
                                 "by_tokens": {}}  # fmt: skip
        for path in files:
            record = _read(path)
            tokens = _tokens(record)
            cell = entry["by_tokens"].setdefault(tokens, {"knn_top1": None, "linear_top1": None})
            if record.get("command") == "knn":
                result = record["results"].get(str(k))
                if result is None:
                    raise UserError(f"{path} has no k = {k} result (it has k = {', '.join(record['results'])}): pass --k")
                cell["knn_top1"] = result["top1"]
                entry.setdefault("protocol", record.get("protocol"))
                entry.setdefault("num_test", record.get("num_test"))
                entry.setdefault("weights", record["weights"].get("path"))
            elif record.get("command") == "linear":
                results = record["results"]
                cell["linear_top1"] = results["top1"] if "top1" in results else results.get("last_top1")
                entry.setdefault("linear_variant", record.get("variant"))
        if entry["by_tokens"]:
            first = next(iter(entry["by_tokens"]))
            entry.update(tokens=first, **entry["by_tokens"][first])
        table.append(entry)
    return table


def feature_columns(table: list[dict[str, Any]]) -> list[str]:
    """The features the table compares, in the order the rows first name them; the raw pixels are
    one feature of every column group, not a group of their own."""
    order: list[str] = []
    for entry in table:
        for tokens in entry["by_tokens"]:
            if tokens != "pixels" and tokens not in order:
                order.append(tokens)
    return order or ["pixels"]


def cell_of(entry: dict[str, Any], tokens: str) -> dict[str, Any]:
    """A row's results for one feature column group (the pixels' row fills every group)."""
    by = entry["by_tokens"]
    return by.get(tokens) or by.get("pixels") or {"knn_top1": None, "linear_top1": None}
