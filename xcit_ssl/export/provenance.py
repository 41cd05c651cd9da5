"""Where exported weights come from and how well they do: the record an export carries.

- :func:`find_knn_results` / :func:`find_linear_results`: the results ``xcit-ssl knn`` /
  ``linear`` wrote for these exact weights;
- :func:`training_facts`: what the weights were trained on and for how long, as the checkpoint
  and its run folder say;
- :func:`source_sha256`: the digest of the source (the record itself: :mod:`xcit_ssl.models.record`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..evaluation.result_index import indexed_results
from ..files import run_dir_of, sha256_file
from ..models.checkpoint_files import load_checkpoint_file
from ..models.record import BackboneRecord


def knn_entries(knn: Any) -> list[dict[str, Any]]:
    # exports written before the entries named their data kept a dict keyed by protocol name
    if isinstance(knn, dict):
        return [{"protocol": p, **r} for p, r in knn.items() if isinstance(r, dict)]
    return [r for r in knn or [] if isinstance(r, dict)]


def _results_of(checkpoint: Path, sha256: str, checkpoint_key: str, command: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` of each ``command`` result in ``<run>/eval/`` and the run's results index
    whose weights' sha256 and checkpoint key match (a teacher's accuracy says nothing about the
    student); unreadable or foreign JSON files are skipped."""
    eval_dir = run_dir_of(checkpoint) / "eval"
    for path in [*sorted(eval_dir.glob("*.json")), *indexed_results(run_dir_of(checkpoint))]:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours, or being written: other files may still match
        if not isinstance(record, dict) or record.get("command") != command:
            continue
        weights, results = record.get("weights"), record.get("results")
        if not isinstance(weights, dict) or not isinstance(results, dict):
            continue
        if weights.get("sha256") == sha256 and weights.get("checkpoint_key", "teacher") == checkpoint_key:
            yield path, record


def _result_file(path: Path, checkpoint: Path) -> str:
    return path.name if path.parent == run_dir_of(checkpoint) / "eval" else str(path)


def _newest_per_data(entries: list[dict[str, Any]], *also: str) -> list[dict[str, Any]] | None:
    """Of the entries on the same protocol, data (and ``also`` fields), the newest; oldest first."""
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        same = json.dumps([entry["protocol"], entry["data"], *(entry.get(a) for a in also)], sort_keys=True)
        if same not in found or str(entry["created"]) >= str(found[same]["created"]):
            found[same] = entry
    return sorted(found.values(), key=lambda e: str(e["created"])) or None


def find_knn_results(checkpoint: Path, sha256: str, checkpoint_key: str) -> list[dict[str, Any]] | None:
    """k-NN results of these exact weights, one entry per data set evaluated, or None.

    Each entry says what was run, never only a protocol name (``knn_imagenet`` run on a 4-class
    folder is not an ImageNet accuracy): ``protocol``, ``data`` (dataset kind, root, splits,
    ``num_train`` / ``num_val`` images evaluated, ``num_classes``), ``features`` (pooling, resize,
    crop, interpolation), ``k``, ``top1``, ``top5``, ``temperature``, ``created``, ``result_file``
    (a name in ``<run>/eval/``, else the full path; ``top5`` is None with 5 classes or fewer).
    Read from the JSON files ``xcit-ssl knn`` writes to ``<run>/eval/``, and from those its
    ``--out`` put elsewhere, which the run's results index lists
    (:mod:`xcit_ssl.evaluation.result_index`); a result counts only when its weights' sha256 and
    checkpoint key match. The headline k = 20 is taken, else the evaluated k closest to it; of the
    results on the same data and features, the newest wins.
    """
    entries = []
    for path, record in _results_of(checkpoint, sha256, checkpoint_key, "knn"):
        results = record["results"]
        ks = [k for k in results if str(k).isdigit() and isinstance(results[k], dict)]
        if not ks:
            continue
        k = min(ks, key=lambda s: (abs(int(s) - 20), int(s)))
        entries.append({
            "protocol": str(record.get("protocol") or path.stem), "data": _evaluated_data(record),
            "features": _features_of(record), "k": int(k), "top1": float(results[k]["top1"]),
            # None where the result has 5 classes or fewer (top-5 would be 100 % by construction)
            "top5": None if results[k].get("top5") is None else float(results[k]["top5"]),
            "temperature": record.get("temperature"), "created": record.get("created"),
            "result_file": _result_file(path, checkpoint),
        })  # fmt: skip
    return _newest_per_data(entries, "features")


def find_linear_results(checkpoint: Path, sha256: str, checkpoint_key: str) -> list[dict[str, Any]] | None:
    """Linear-probe results of these exact weights (``xcit-ssl linear``), or None: per entry
    ``protocol``, ``variant`` (``linear``: the augmented probe; ``linear_fast``: cached features,
    no augmentation), ``data``, ``features``, ``epochs``, ``top1`` / ``top5`` of the headline (the
    last epoch), ``created``, ``result_file``; the same matching rules as :func:`find_knn_results`."""
    entries = []
    for path, record in _results_of(checkpoint, sha256, checkpoint_key, "linear"):
        results = record["results"]
        top1 = results.get("top1", results.get("last_top1"))  # files before the headline was named top1
        if not isinstance(top1, (int, float)):
            continue  # no epoch evaluated
        data = _evaluated_data(record)
        data.update(num_train=results.get("num_train", data["num_train"]), num_val=results.get("num_val", data["num_val"]))
        top5 = results.get("top5", results.get("last_top5"))
        entries.append({
            "protocol": str(record.get("protocol") or path.stem), "variant": record.get("variant", "linear"),
            "data": data, "features": _features_of(record),
            "epochs": ((record.get("protocol_config") or {}).get("linear") or {}).get("epochs", results.get("epoch")),
            "top1": float(top1), "top5": None if top5 is None else float(top5),
            "created": record.get("created"), "result_file": _result_file(path, checkpoint),
        })  # fmt: skip
    return _newest_per_data(entries, "features", "variant")


def _features_of(record: dict[str, Any]) -> dict[str, Any]:
    feats = (record.get("protocol_config") or {}).get("features") or {}
    return {k: feats.get(k, "cls" if k == "pooling" else None) for k in ("pooling", "resize_size", "crop_size", "interpolation")}


def _evaluated_data(record: dict[str, Any]) -> dict[str, Any]:
    """The data a k-NN record ran on, as far as the record says (older records say less)."""
    data = dict(record.get("data") or {})
    configured = (record.get("protocol_config") or {}).get("data") or {}
    for key in ("dataset", "root", "train_split", "val_split"):
        data.setdefault(key, configured.get(key))
    data.update(num_train=record.get("num_train"), num_val=record.get("num_test"), num_classes=record.get("num_classes"))
    return data


def _measured_on(entry: dict[str, Any]) -> str:
    data = entry.get("data") or {}
    where = " ".join(str(v) for v in (data.get("dataset"), data.get("root")) if v) or "unknown data"
    size = f"{data.get('num_train')} train / {data.get('num_val')} val images"
    classes = f", {data['num_classes']} classes" if data.get("num_classes") else ""
    pooling = (entry.get("features") or {}).get("pooling")
    return f"{where}: {size}{classes}{f', {pooling} features' if pooling else ''}; protocol {entry.get('protocol')}"


def _top(entry: dict[str, Any]) -> str:
    return f"top-1 {entry['top1']:.2f} %" + ("" if entry.get("top5") is None else f", top-5 {entry['top5']:.2f} %")


def describe_knn(entry: dict[str, Any]) -> str:
    """One line: the accuracy and what it was measured on (protocol, data set, images, classes)."""
    return f"{_top(entry)} (k={entry['k']}) on {_measured_on(entry)}"


def describe_linear(entry: dict[str, Any]) -> str:
    """One line: the probe's headline accuracy, which probe, and what it was measured on."""
    return f"{_top(entry)} ({entry.get('variant')}, {entry.get('epochs')} epochs) on {_measured_on(entry)}"


def training_facts(checkpoint: Path, record: BackboneRecord) -> dict[str, Any] | None:
    """How the weights were trained, as far as the source says, else None.

    From a training checkpoint: ``steps`` (optimizer steps, Lightning's ``global_step``),
    ``epochs`` (steps / the run's steps per epoch, when its run record has them), ``global_batch``,
    ``data`` (``dataset``, ``root``, ``train_split``, ``num_images``: the checkpoint's record, else
    the run folder's ``config.yaml`` without a count). From an export: what it carried.
    """
    if isinstance(record.extra.get("training"), dict):
        return dict(record.extra["training"])  # an export re-exported: its own record
    obj, _ = load_checkpoint_file(checkpoint)
    if not isinstance(obj, dict) or "global_step" not in obj:
        return None  # weights only: nothing says how they were trained
    steps = int(obj["global_step"])
    run_record = ((obj.get("callbacks") or {}).get("RunRecord") or {}) if isinstance(obj.get("callbacks"), dict) else {}
    per_epoch = run_record.get("steps_per_epoch")
    data = record.extra.get("train_data") or _configured_data(run_dir_of(checkpoint) / "config.yaml")
    return {
        "steps": steps, "epochs": round(steps / per_epoch, 3) if isinstance(per_epoch, int) and per_epoch > 0 else None,
        "steps_per_epoch": per_epoch, "global_batch": run_record.get("global_batch"), "data": data,
    }  # fmt: skip


def _configured_data(config: Path) -> dict[str, Any] | None:
    """The training data a run folder's saved config names (checkpoints older than ``train_data``)."""
    import yaml  # noqa: PLC0415

    try:
        cfg = yaml.safe_load(config.read_text())
        init = cfg["data"]["init_args"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return {"dataset": init.get("dataset"), "root": init.get("root"), "train_split": init.get("train_split"),
            "num_images": None}  # fmt: skip


def source_sha256(checkpoint: Path) -> str:
    """The checkpoint's sha256, through the digest index ``xcit-ssl knn`` keeps beside its feature
    cache when there is one, so a multi-GB checkpoint is hashed once."""
    index = run_dir_of(checkpoint) / "eval" / "feature_cache" / "sha256_index.json"
    return sha256_file(checkpoint, index if index.is_file() else None)
