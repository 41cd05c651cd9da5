"""Where exported weights come from and how well they do: the record an export carries.

- :func:`find_knn_results`: the k-NN results ``xcit-ssl knn`` wrote for these exact weights;
- :func:`source_sha256`: the digest of the source (the record itself: :mod:`xcit_ssl.models.record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..evaluation.result_index import indexed_results
from ..files import run_dir_of, sha256_file


def knn_entries(knn: Any) -> list[dict[str, Any]]:
    # exports written before the entries named their data kept a dict keyed by protocol name
    if isinstance(knn, dict):
        return [{"protocol": p, **r} for p, r in knn.items() if isinstance(r, dict)]
    return [r for r in knn or [] if isinstance(r, dict)]


def find_knn_results(checkpoint: Path, sha256: str, checkpoint_key: str) -> list[dict[str, Any]] | None:
    """k-NN results of these exact weights, one entry per data set evaluated, or None.

    Each entry says what was run, never only a protocol name (``knn_imagenet`` run on a 4-class
    folder is not an ImageNet accuracy): ``protocol``, ``data`` (dataset kind, root, splits,
    ``num_train`` / ``num_val`` images evaluated, ``num_classes``), ``k``, ``top1``, ``top5``,
    ``temperature``, ``created``, ``result_file`` (a name in ``<run>/eval/``, else the full path;
    ``top5`` is None with 5 classes or fewer). Read from the JSON files ``xcit-ssl knn`` writes to
    ``<run>/eval/``, and from those its ``--out`` put elsewhere, which the run's results index
    lists (:mod:`xcit_ssl.evaluation.result_index`); a result counts only when its weights' sha256
    and checkpoint key match (a teacher's accuracy says nothing about the student). The headline
    k = 20 is taken, else the evaluated k closest to it; of the results on the same data, the
    newest wins.
    """
    found: dict[str, dict[str, Any]] = {}
    eval_dir = run_dir_of(checkpoint) / "eval"
    for path in [*sorted(eval_dir.glob("*.json")), *indexed_results(run_dir_of(checkpoint))]:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours, or being written: other files may still match
        weights = record.get("weights") if isinstance(record, dict) else None
        results = record.get("results") if isinstance(record, dict) else None
        if record.get("command") != "knn" or not isinstance(weights, dict) or not isinstance(results, dict):
            continue
        if weights.get("sha256") != sha256 or weights.get("checkpoint_key", "teacher") != checkpoint_key:
            continue
        ks = [k for k in results if str(k).isdigit() and isinstance(results[k], dict)]
        if not ks:
            continue
        k = min(ks, key=lambda s: (abs(int(s) - 20), int(s)))
        data = _evaluated_data(record)
        entry = {
            "protocol": str(record.get("protocol") or path.stem), "data": data,
            "k": int(k), "top1": float(results[k]["top1"]),
            # None where the result has 5 classes or fewer (top-5 would be 100 % by construction)
            "top5": None if results[k].get("top5") is None else float(results[k]["top5"]),
            "temperature": record.get("temperature"), "created": record.get("created"),
            "result_file": path.name if path.parent == eval_dir else str(path),
        }  # fmt: skip
        same_data = json.dumps([entry["protocol"], data], sort_keys=True)
        if same_data not in found or str(entry["created"]) >= str(found[same_data]["created"]):
            found[same_data] = entry
    return sorted(found.values(), key=lambda e: str(e["created"])) or None


def _evaluated_data(record: dict[str, Any]) -> dict[str, Any]:
    """The data a k-NN record ran on, as far as the record says (older records say less)."""
    data = dict(record.get("data") or {})
    configured = (record.get("protocol_config") or {}).get("data") or {}
    for key in ("dataset", "root", "train_split", "val_split"):
        data.setdefault(key, configured.get(key))
    data.update(num_train=record.get("num_train"), num_val=record.get("num_test"), num_classes=record.get("num_classes"))
    return data


def describe_knn(entry: dict[str, Any]) -> str:
    """One line: the accuracy and what it was measured on (protocol, data set, images, classes)."""
    data = entry.get("data") or {}
    where = " ".join(str(v) for v in (data.get("dataset"), data.get("root")) if v) or "unknown data"
    size = f"{data.get('num_train')} train / {data.get('num_val')} val images"
    classes = f", {data['num_classes']} classes" if data.get("num_classes") else ""
    top5 = "" if entry.get("top5") is None else f", top-5 {entry['top5']:.2f} %"
    return (f"top-1 {entry['top1']:.2f} %{top5} (k={entry['k']}) on {where}: "
            f"{size}{classes}; protocol {entry.get('protocol')}")  # fmt: skip


def source_sha256(checkpoint: Path) -> str:
    """The checkpoint's sha256, through the digest index ``xcit-ssl knn`` keeps beside its feature
    cache when there is one, so a multi-GB checkpoint is hashed once."""
    index = run_dir_of(checkpoint) / "eval" / "feature_cache" / "sha256_index.json"
    return sha256_file(checkpoint, index if index.is_file() else None)
