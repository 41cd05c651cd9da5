"""``xcit-ssl shard``: write an image folder as WebDataset tar shards or litdata chunks.

    xcit-ssl shard --root /data/imagenet --out /data/imagenet-wds            # train/ and val/ shards
    xcit-ssl shard --root /data/imagenet --out /data/imagenet-lit --format litdata

An ImageNet-layout folder (``root/<split>/<class>/*``) gives one sub-folder of shards per split,
labels kept; a folder with class sub-folders and no splits gives one labelled set; any other tree of
images one unlabelled set. The images' own bytes are stored (no re-encoding). Each split gets
``manifest.json``: format, sample count, classes, the SHA-256 of the sorted file list and, for
WebDataset, every shard's members with their byte offsets (so readers seek instead of scanning).

WebDataset shards are written one at a time to a temporary file in the output folder and renamed
when complete; an interrupted run, started again with the same arguments, keeps the shards that
are complete and writes the rest (the file list must be unchanged: its hash is checked). litdata's
``optimize`` writes the chunks (its own checkpointing resumes an interrupted run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..data.datasets import FlatImageDataset, ImageFolderDataset, _ImageFiles
from ..data.shards import IMAGE_EXTS, MANIFEST, index_tar
from ..errors import UserError

logger = logging.getLogger(__name__)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_source(root: Path) -> dict[str | None, _ImageFiles]:
    """``{split: dataset}`` of the folder to shard (see the module docstring)."""
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [p for p in subdirs if p.name in ("train", "val", "test")]
    if splits:
        train = splits[0].name if splits[0].name == "train" else None
        sets: dict[str | None, _ImageFiles] = {}
        classes = ImageFolderDataset(root, train).classes if train else None
        for split in splits:
            sets[split.name] = ImageFolderDataset(root, split.name, classes=classes)
        return sets
    if subdirs:  # class sub-folders: one labelled set
        return {None: ImageFolderDataset(root, None)}
    return {None: FlatImageDataset(root)}


def _file_list_hash(dataset: _ImageFiles, root: Path) -> str:
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(os.path.relpath(dataset.path(i), root).encode())
        digest.update(b"\0%d\n" % int(dataset.targets[i]))
    return digest.hexdigest()


def _progress(description: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False)


def write_webdataset(dataset: _ImageFiles, out: Path, root: Path, shard_size: int) -> dict[str, Any]:
    """Tar shards ``shard-NNNNNN.tar`` of ``shard_size`` samples each; returns the manifest."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    file_hash = _file_list_hash(dataset, root)
    partial_path = out / ".manifest.partial.json"
    done: dict[str, Any] = {}
    if partial_path.is_file():
        partial = json.loads(partial_path.read_text())
        if partial.get("file_list_sha256") != file_hash:
            raise UserError(
                f"{out} holds shards of another file list: pass an empty --out folder, or the same --root as before"
            )
        done = {s["name"]: s for s in partial["shards"]}
    for stale in out.glob(".*.tar.tmp-*"):
        stale.unlink()
    n = len(dataset)
    count = (n + shard_size - 1) // shard_size
    shards: list[dict[str, Any]] = []
    with _progress(f"shard {out.name}") as bar:
        task = bar.add_task("", total=n)
        for k in range(count):
            name = f"shard-{k:06d}.tar"
            start, stop = k * shard_size, min(n, (k + 1) * shard_size)
            final = out / name
            if name in done and final.is_file() and final.stat().st_size == done[name]["bytes"]:
                shards.append(done[name])
                bar.advance(task, stop - start)
                continue
            tmp = out / f".{name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                writer = wds.TarWriter(f, encoder=False)
                for i in range(start, stop):
                    path = dataset.path(i)
                    ext = Path(path).suffix.lower().lstrip(".") or "jpg"
                    ext = "jpg" if ext == "jpeg" else ext
                    if ext not in IMAGE_EXTS:
                        ext = "jpg"
                    sample = {"__key__": f"{i:09d}", ext: Path(path).read_bytes()}
                    if int(dataset.targets[i]) >= 0:
                        sample["cls"] = str(int(dataset.targets[i])).encode()
                    writer.write(sample)
                    bar.advance(task)
                writer.close()
                f.flush()
                os.fsync(f.fileno())
            members, truncated = index_tar(tmp)
            if truncated or len(members) != stop - start:
                tmp.unlink(missing_ok=True)
                raise UserError(f"writing {name} failed (read back {len(members)} of {stop - start} samples)")
            os.replace(tmp, final)
            entry = {"name": name, "samples": stop - start, "bytes": final.stat().st_size, "members": members}
            shards.append(entry)
            _write_json(partial_path, {"file_list_sha256": file_hash, "shards": shards})
    manifest = {
        "format": "webdataset", "samples": n, "classes": list(dataset.classes), "labelled": bool(dataset.classes),
        "file_list_sha256": file_hash, "source": str(root), "shards": shards,
    }  # fmt: skip
    _write_json(out / MANIFEST, manifest)
    partial_path.unlink(missing_ok=True)
    return manifest


def _litdata_item(item: tuple[str, int]) -> dict[str, Any]:
    path, label = item
    return {"image": Path(path).read_bytes(), "label": int(label)}


def write_litdata(dataset: _ImageFiles, out: Path, root: Path, chunk_bytes: str) -> dict[str, Any]:
    """litdata optimized chunks through ``litdata.optimize`` (resumable with its checkpoints)."""
    from litdata import optimize

    inputs = [(dataset.path(i), int(dataset.targets[i])) for i in range(len(dataset))]
    optimize(
        fn=_litdata_item, inputs=inputs, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=1,
        use_checkpoint=True, reorder_files=False, mode=None, verbose=True,
    )  # fmt: skip
    manifest = {
        "format": "litdata", "samples": len(inputs), "classes": list(dataset.classes),
        "labelled": bool(dataset.classes), "file_list_sha256": _file_list_hash(dataset, root), "source": str(root),
        "labels": [label for _, label in inputs],
    }  # fmt: skip
    _write_json(out / MANIFEST, manifest)
    return manifest


def shard_main(argv: list[str]) -> int:
    """``xcit-ssl shard``: see the module docstring. Returns 0."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="xcit-ssl shard", default_meta=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=str, required=True, help="image folder (ImageNet layout, classes, or flat)")
    parser.add_argument("--out", type=str, required=True, help="output folder (one sub-folder per split)")
    parser.add_argument("--format", type=str, default="webdataset", help="webdataset (tar shards) or litdata")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per WebDataset shard")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="litdata chunk size")
    cfg = parser.parse_args(argv)
    if cfg.format not in ("webdataset", "litdata"):
        raise UserError(f"--format {cfg.format}: use webdataset or litdata")
    if cfg.shard_size < 1:
        raise UserError(f"--shard_size {cfg.shard_size}: use a positive number of samples")
    root, out = Path(cfg.root), Path(cfg.out)
    sources = _open_source(root)
    for split, dataset in sources.items():
        target = out / split if split else out
        if cfg.format == "litdata" and (target / MANIFEST).is_file():
            logger.info("%s is complete already", target)
            continue
        if cfg.format == "webdataset":
            manifest = write_webdataset(dataset, target, root, cfg.shard_size)
        else:
            manifest = write_litdata(dataset, target, root, cfg.chunk_bytes)
        what = f"{len(manifest['classes'])} classes" if manifest["classes"] else "unlabelled"
        print(f"{target}: {manifest['samples']} samples ({what}), {cfg.format}")
    return 0


__all__ = ["shard_main", "write_litdata", "write_webdataset"]
