"""Write an image folder as WebDataset tar shards or litdata chunks (the library half of
``xcit-ssl shard``; the readers are :mod:`xcit_ssl.data.shards`).

An ImageNet-layout folder (``root/<split>/<class>/*``) gives one sub-folder of shards per split,
labels kept; a folder with class sub-folders and no splits gives one labelled set; any other tree of
images one unlabelled set (:func:`open_shard_source`). The images' own bytes are stored (no
re-encoding). Each split gets ``manifest.json``: format, sample count, classes, the SHA-256 of the
sorted file list and, for WebDataset, every shard's members with their byte offsets (so readers
seek instead of scanning).

WebDataset shards are written one at a time through :func:`xcit_ssl.files.atomic_path` (a
temporary file in the output folder, renamed when complete); an interrupted run, started again
with the same arguments, keeps the shards that are complete and writes the rest (the file list must
be unchanged: its hash is checked). litdata's ``optimize`` writes the chunks (its own checkpointing
resumes an interrupted run).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from xcit_ssl.data.datasets import FlatImageDataset, ImageFolderDataset
from xcit_ssl.data.images import IMAGE_EXTENSIONS, ImageFileDataset
from xcit_ssl.data.shards import MANIFEST, index_tar
from xcit_ssl.errors import UserError
from xcit_ssl.files import atomic_path, atomic_write, remove_stale_temporaries

PARTIAL_MANIFEST = ".manifest.partial.json"  # the shards complete so far, for a resumed run

__all__ = ["file_list_hash", "open_shard_source", "write_litdata", "write_webdataset"]


def _write_manifest(path: Path, payload: dict[str, Any]) -> None:
    # Compact JSON, as shards have always been written: a manifest lists every member of every
    # shard (1.3M entries for ImageNet), which indentation would make several times larger.
    with atomic_write(path, "w") as fh:
        json.dump(payload, fh)


def open_shard_source(root: Path) -> dict[str | None, ImageFileDataset]:
    """``{split: dataset}`` of the folder to shard (see the module docstring); split None: no splits."""
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [p for p in subdirs if p.name in ("train", "val", "test")]
    if splits:
        train = splits[0].name if splits[0].name == "train" else None
        sets: dict[str | None, ImageFileDataset] = {}
        classes = ImageFolderDataset(root, train).classes if train else None
        for split in splits:
            sets[split.name] = ImageFolderDataset(root, split.name, classes=classes)
        return sets
    if subdirs:  # class sub-folders: one labelled set
        return {None: ImageFolderDataset(root, None)}
    return {None: FlatImageDataset(root)}


def file_list_hash(dataset: ImageFileDataset, root: Path) -> str:
    """SHA-256 of the dataset's file paths (relative to ``root``) and labels, in order."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(os.path.relpath(dataset.path(i), root).encode())
        digest.update(b"\0%d\n" % int(dataset.targets[i]))
    return digest.hexdigest()


def _progress(description: str) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False)


def _member_ext(path: str) -> str:
    """The tar member extension of an image file: its own suffix (``jpeg`` spelt ``jpg``, the
    WebDataset convention), ``jpg`` for a suffix that is not an image's."""
    ext = Path(path).suffix.lower()
    ext = ".jpg" if ext == ".jpeg" or ext not in IMAGE_EXTENSIONS else ext
    return ext[1:]


def _write_tar(dataset: ImageFileDataset, start: int, stop: int, tmp: Path, bar: Any, task: Any) -> None:
    """Samples ``start..stop-1`` as one tar shard at ``tmp``: members ``<index:09d>.<ext>`` (the
    file's bytes) and ``<index:09d>.cls`` (the label, for labelled data)."""
    import webdataset as wds

    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for i in range(start, stop):
            path = dataset.path(i)
            sample = {"__key__": f"{i:09d}", _member_ext(path): Path(path).read_bytes()}
            if int(dataset.targets[i]) >= 0:
                sample["cls"] = str(int(dataset.targets[i])).encode()
            writer.write(sample)
            bar.advance(task)
        writer.close()


def write_webdataset(dataset: ImageFileDataset, out: Path, root: Path, shard_size: int) -> dict[str, Any]:
    """Tar shards ``shard-NNNNNN.tar`` of ``shard_size`` samples each in ``out``; returns the manifest
    (also written to ``out/manifest.json``). Resumes an interrupted run (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    file_hash = file_list_hash(dataset, root)
    partial_path = out / PARTIAL_MANIFEST
    done: dict[str, Any] = {}
    if partial_path.is_file():
        partial = json.loads(partial_path.read_text())
        if partial.get("file_list_sha256") != file_hash:
            raise UserError(
                f"{out} holds shards of another file list: pass an empty --out folder, or the same --root as before"
            )
        done = {s["name"]: s for s in partial["shards"]}
    remove_stale_temporaries(out)  # a killed run's half-written shard or manifest
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
            with atomic_path(final) as tmp:
                _write_tar(dataset, start, stop, tmp, bar, task)
                members, truncated = index_tar(tmp)
                if truncated or len(members) != stop - start:  # the temporary file is removed, final untouched
                    raise UserError(f"writing {name} failed (read back {len(members)} of {stop - start} samples)")
            entry = {"name": name, "samples": stop - start, "bytes": final.stat().st_size, "members": members}
            shards.append(entry)
            _write_manifest(partial_path, {"file_list_sha256": file_hash, "shards": shards})
    manifest = {
        "format": "webdataset", "samples": n, "classes": list(dataset.classes), "labelled": bool(dataset.classes),
        "file_list_sha256": file_hash, "source": str(root), "shards": shards,
    }  # fmt: skip
    _write_manifest(out / MANIFEST, manifest)
    partial_path.unlink(missing_ok=True)
    return manifest


def _litdata_item(item: tuple[str, int]) -> dict[str, Any]:
    """One litdata item ``{"image": file bytes, "label": int}`` (module level: workers pickle it)."""
    path, label = item
    return {"image": Path(path).read_bytes(), "label": int(label)}


def write_litdata(dataset: ImageFileDataset, out: Path, root: Path, chunk_bytes: str) -> dict[str, Any]:
    """litdata optimized chunks through ``litdata.optimize`` (resumable with its checkpoints);
    returns the manifest (also written to ``out/manifest.json``, with every sample's label)."""
    from litdata import optimize

    inputs = [(dataset.path(i), int(dataset.targets[i])) for i in range(len(dataset))]
    optimize(
        fn=_litdata_item, inputs=inputs, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=1,
        use_checkpoint=True, reorder_files=False, mode=None, verbose=True,
    )  # fmt: skip
    manifest = {
        "format": "litdata", "samples": len(inputs), "classes": list(dataset.classes),
        "labelled": bool(dataset.classes), "file_list_sha256": file_list_hash(dataset, root), "source": str(root),
        "labels": [label for _, label in inputs],
    }  # fmt: skip
    _write_manifest(out / MANIFEST, manifest)
    return manifest
