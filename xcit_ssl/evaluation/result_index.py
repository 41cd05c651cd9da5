"""Where a run's evaluation results went: ``<run>/eval/results_index.json``.

``xcit-ssl knn`` / ``linear`` write their JSON result to ``<run>/eval/`` unless ``--out`` names
another place; a result written elsewhere is listed in this index of the run folder, so whoever
looks for a run's results (``xcit-ssl export``'s provenance) finds it there too. The index holds
paths only: a reader checks each file itself (its weights' sha256 and checkpoint key), so a moved or
rewritten file is skipped, never trusted. Two evaluations finishing at the same instant may lose one
entry (read, add, atomic replace); the result file itself is never at risk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..files import OutputError, write_json

log = logging.getLogger(__name__)

INDEX_NAME = "results_index.json"


def index_path(run_dir: Path) -> Path:
    """The index file of a run folder."""
    return Path(run_dir) / "eval" / INDEX_NAME


def _entries(index: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []  # absent, or not ours: started afresh
    entries = data.get("results") if isinstance(data, dict) else None
    return [e for e in entries or [] if isinstance(e, dict) and isinstance(e.get("path"), str)]


def index_result(run_dir: Path, result: Path, record: dict[str, Any]) -> Path | None:
    """List ``result`` (a JSON result just written from ``record``) in the run's index when it lies
    outside ``<run>/eval/``; returns the index path, or None where nothing was needed or possible.

    Raw-pixel results belong to no run. A run folder that cannot be written is not an error (the
    result itself is written): a warning says what will not find the result and what to do.
    """
    if (record.get("weights") or {}).get("sha256") == "raw_pixels":
        return None
    result, index = Path(result).resolve(), index_path(run_dir)
    if result.parent == index.parent.resolve():
        return None  # the folder itself is searched
    entries = [e for e in _entries(index) if Path(e["path"]) != result]
    entries.append({"path": str(result), "command": record.get("command"), "protocol": record.get("protocol"),
                    "created": record.get("created")})  # fmt: skip
    try:
        write_json(index, {"results": entries})
    except OutputError as err:
        log.warning("%s is not listed in %s (%s): xcit-ssl export of these weights will not find it; copy it "
                    "into %s to have it found", result, index, err, index.parent)  # fmt: skip
        return None
    log.info("result listed in %s", index)
    return index


def indexed_results(run_dir: Path) -> list[Path]:
    """The result files the run's index lists that still exist, oldest entry first."""
    return [Path(e["path"]) for e in _entries(index_path(run_dir)) if Path(e["path"]).is_file()]
