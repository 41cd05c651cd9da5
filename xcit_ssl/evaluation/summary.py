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
    """``[(label, [result files])]`` -> one dict per row: k-NN top-1 at ``k``, linear top-1 (last epoch)."""
    table = []
    for label, files in rows:
        entry: dict[str, Any] = {"label": label, "knn_top1": None, "linear_top1": None, "files": files}
        for path in files:
            record = _read(path)
            if record.get("command") == "knn":
                result = record["results"].get(str(k))
                if result is None:
                    raise UserError(f"{path} has no k = {k} result (it has k = {', '.join(record['results'])}): pass --k")
                entry.update(knn_top1=result["top1"], protocol=record.get("protocol"),
                             num_test=record.get("num_test"), weights=record["weights"].get("path"),
                             tokens=_tokens(record))  # fmt: skip
            elif record.get("command") == "linear":
                results = record["results"]
                entry["linear_top1"] = results["top1"] if "top1" in results else results.get("last_top1")
                entry["linear_variant"] = record.get("variant")
        table.append(entry)
    return table
