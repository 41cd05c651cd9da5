"""Write an image folder as WebDataset tar shards or litdata chunks (the library half of
``xcit-ssl shard``; the readers are :mod:`xcit_ssl.data.shards`).

An ImageNet-layout folder (``root/<split>/<class>/*``) gives one sub-folder of shards per split,
labels kept; a folder with class sub-folders and no splits gives one labelled set; any other tree of
images one unlabelled set (:func:`open_shard_source`). The images' own bytes are stored (no
re-encoding). Each split gets ``manifest.json``: format, sample count, classes, the SHA-256 of the
sorted file list and, for WebDataset, every shard's members with their byte offsets (so readers
seek instead of scanning).

WebDataset shards are written one at a time through :func:`xcit_ssl.files.atomic_path`; a run
started again with the same arguments keeps the complete shards and writes the rest (the file list's
hash is checked). litdata's ``optimize`` writes the chunks (its checkpointing resumes a run).

One output folder, one data set (:func:`write_shards`): shards of another file list or format (or
without a manifest) are refused unless ``--overwrite``. Then the new set is written into
``<folder>/.overwrite/`` (hidden from the readers: the old set stays complete and readable all the
while) and swapped in: ``manifest.json`` is removed (readers now refuse the folder as unfinished),
the new files are renamed over the old, every other shard file is removed, and the new
``manifest.json`` is renamed in last. Only those renames stand between two sets; a run killed there
is finished by running it again. The same files with another ``--shard_size`` take the same route.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

from xcit_ssl.console import prints_to_debug_log
from xcit_ssl.data.datasets import DataFlags, FlatImageDataset, ImageFolderDataset
from xcit_ssl.data.images import IMAGE_EXTENSIONS, ImageFileDataset
from xcit_ssl.data.shards import MANIFEST, PARTIAL_MANIFEST, SPLITS, STAGING, index_tar
from xcit_ssl.errors import UserError
from xcit_ssl.files import atomic_link, atomic_path, atomic_write, check_writable, remove_stale_temporaries

log = logging.getLogger(__name__)

#: what the folder-reading errors name under ``xcit-ssl shard`` (``fit``'s ``--data.*`` otherwise)
SHARD_FLAGS = DataFlags("--root", "that folder on its own as --root (a folder without sub-folders is sharded unlabelled)",
                        "point --root at the folder that holds train/ (and val/, test/)")  # fmt: skip

__all__ = ["SHARD_FLAGS", "file_list_hash", "open_shard_source", "write_litdata", "write_shards", "write_webdataset"]


def _write_manifest(path: Path, payload: dict[str, Any]) -> None:
    # Compact JSON, as shards have always been written: a manifest lists every member of every
    # shard (1.3M entries for ImageNet), which indentation would make several times larger.
    with atomic_write(path, "w") as fh:
        json.dump(payload, fh)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A manifest's contents; None when absent or unreadable (the folder then holds an unknown set)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        payload = None
    return payload if isinstance(payload, dict) else None


def open_shard_source(root: Path) -> dict[str | None, ImageFileDataset]:
    """``{split: dataset}`` of the folder to shard (see the module docstring); split None: no splits."""
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [p for p in subdirs if p.name in SPLITS]
    if splits:
        sets: dict[str | None, ImageFileDataset] = {}
        if splits[0].name == "train":  # the training classes index every split
            sets["train"] = ImageFolderDataset(root, "train", flags=SHARD_FLAGS)
        classes = sets["train"].classes if sets else None
        for split in splits[len(sets) :]:
            sets[split.name] = ImageFolderDataset(root, split.name, classes=classes, flags=SHARD_FLAGS)
        return sets
    if subdirs:  # class sub-folders: one labelled set
        return {None: ImageFolderDataset(root, None, flags=SHARD_FLAGS)}
    return {None: FlatImageDataset(root, flags=SHARD_FLAGS)}


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


def _read_source(path: str) -> bytes:
    """An image file's bytes; a file that cannot be read stops the run with its name (raised outside
    the ``except`` so no OSError rides along as context: the shard's writer would take it for the
    output's fault)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        failure = err.strerror or str(err)
    raise UserError(f"cannot read {path} ({failure}): fix or remove the file under --root and run again")


def _write_tar(dataset: ImageFileDataset, start: int, stop: int, tmp: Path, bar: Any, task: Any) -> None:
    """Samples ``start..stop-1`` as one tar shard at ``tmp``: members ``<index:09d>.<ext>`` (the
    file's bytes) and ``<index:09d>.cls`` (the label, for labelled data)."""
    import webdataset as wds

    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for i in range(start, stop):
            path = dataset.path(i)
            sample = {"__key__": f"{i:09d}", _member_ext(path): _read_source(path)}
            if int(dataset.targets[i]) >= 0:
                sample["cls"] = str(int(dataset.targets[i])).encode()
            writer.write(sample)
            bar.advance(task)
        writer.close()


def _shard_counts(n: int, shard_size: int) -> list[int]:
    """Samples per shard of ``n`` samples in shards of ``shard_size``."""
    return [min(shard_size, n - start) for start in range(0, n, shard_size)]


def write_webdataset(
    dataset: ImageFileDataset, out: Path, root: Path, shard_size: int, file_hash: str | None = None
) -> dict[str, Any]:
    """Tar shards ``shard-NNNNNN.tar`` of ``shard_size`` samples each in ``out``; returns the manifest
    (also written to ``out/manifest.json``). Resumes an interrupted run (module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    file_hash = file_hash or file_list_hash(dataset, root)
    partial_path = out / PARTIAL_MANIFEST
    earlier = _read_json(partial_path) or _read_json(out / MANIFEST) or {"file_list_sha256": file_hash}
    if earlier.get("file_list_sha256") != file_hash:
        raise UserError(f"{out} holds shards of another file list: pass --overwrite to replace them, or another --out")
    done = {s["name"]: s for s in earlier.get("shards", [])}  # complete shards of an earlier run
    remove_stale_temporaries(out)  # a killed run's half-written shard or manifest
    n = len(dataset)
    counts = _shard_counts(n, shard_size)
    shards: list[dict[str, Any]] = []

    def kept(k: int, name: str) -> bool:  # a shard of the same samples, complete on disk
        entry, start = done.get(name), k * shard_size
        return bool(entry and entry["samples"] == counts[k] and entry["members"][0][0] == f"{start:09d}"
                    and (out / name).is_file() and (out / name).stat().st_size == entry["bytes"])  # fmt: skip

    names = [f"shard-{k:06d}.tar" for k in range(len(counts))]
    if (out / MANIFEST).is_file() and not all(kept(k, name) for k, name in enumerate(names)):
        # a complete set is about to change: mark it unfinished first, so no reader sees a mixture
        _write_manifest(partial_path, {"format": "webdataset", "file_list_sha256": file_hash, "source": str(root),
                                       "shards": [done[nm] for k, nm in enumerate(names) if kept(k, nm)]})  # fmt: skip
        (out / MANIFEST).unlink()
    with _progress(f"shard {out.name}") as bar:
        task = bar.add_task("", total=n)
        for k, name in enumerate(names):
            start, stop = k * shard_size, k * shard_size + counts[k]
            final = out / name
            if kept(k, name):
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
            _write_manifest(partial_path, {"format": "webdataset", "file_list_sha256": file_hash,
                                           "source": str(root), "shards": shards})  # fmt: skip
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
    return {"image": _read_source(path), "label": int(label)}


def write_litdata(
    dataset: ImageFileDataset, out: Path, root: Path, chunk_bytes: str, file_hash: str | None = None
) -> dict[str, Any]:
    """litdata optimized chunks through ``litdata.optimize`` (resumable with its checkpoints);
    returns the manifest (also written to ``out/manifest.json``, with every sample's label)."""
    from litdata import optimize

    file_hash = file_hash or file_list_hash(dataset, root)
    out.mkdir(parents=True, exist_ok=True)
    # marks the folder as ours and unfinished until manifest.json is written (readers refuse it)
    _write_manifest(out / PARTIAL_MANIFEST, {"format": "litdata", "file_list_sha256": file_hash, "source": str(root)})
    inputs = [(dataset.path(i), int(dataset.targets[i])) for i in range(len(dataset))]
    if not (out / "index.json").is_file():  # optimize refuses a folder it has completed
        # litdata sets the process-wide start method (spawn by default): keep this process's own.
        # verbose for its progress bar; what it prints (an account advertisement, set-up steps,
        # each worker's start and end) is hidden: the result and any failure reach us as such
        log.info("litdata: writing %d images as chunks into %s", len(inputs), out)
        with prints_to_debug_log("litdata.optimize"):
            optimize(
                fn=_litdata_item, inputs=inputs, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=1,
                use_checkpoint=True, reorder_files=False, mode=None, verbose=True,
                start_method=multiprocessing.get_start_method(allow_none=False),
            )  # fmt: skip
    manifest = {
        "format": "litdata", "samples": len(inputs), "classes": list(dataset.classes),
        "labelled": bool(dataset.classes), "file_list_sha256": file_hash, "source": str(root),
        "labels": [label for _, label in inputs],
    }  # fmt: skip
    _write_manifest(out / MANIFEST, manifest)
    (out / PARTIAL_MANIFEST).unlink(missing_ok=True)
    return manifest


# ---- one data set per folder --------------------------------------------------------------


def _shard_files(folder: Path) -> set[str]:
    """Names of the shard files in ``folder`` (tar shards, litdata chunks and index), not the manifests."""
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.is_file() and (p.suffix in (".tar", ".bin") or p.name == "index.json")}


def _set_files(folder: Path, manifest: dict[str, Any]) -> set[str]:
    """The shard files of the set ``manifest`` describes (litdata: its ``index.json`` and chunks)."""
    if manifest.get("format") == "litdata":
        index = _read_json(folder / "index.json") or {}
        return {"index.json", *(c.get("filename", "") for c in index.get("chunks", []))}
    return {s["name"] for s in manifest.get("shards", [])}


def _held(folder: Path) -> dict[str, Any] | None:
    """What ``folder`` holds: its manifest (``complete``), an unfinished run's partial manifest, the
    replacement set being swapped in (``.overwrite/manifest.json`` without ``manifest.json``),
    ``{"unknown": True}`` for shard files with none of these, or None for no shards at all."""
    for path, state in ((folder / MANIFEST, "complete"), (folder / STAGING / MANIFEST, "swapping"),
                        (folder / PARTIAL_MANIFEST, "unfinished")):  # fmt: skip
        if path.is_file():
            payload = _read_json(path)
            return {"unknown": True} if payload is None else {**payload, "state": state}
    return {"unknown": True} if _shard_files(folder) else None


def _same_data(held: dict[str, Any] | None, fmt: str, file_hash: str) -> bool:
    return held is not None and held.get("format", "webdataset") == fmt and held.get("file_list_sha256") == file_hash


def _same_layout(held: dict[str, Any], n: int, fmt: str, shard_size: int) -> bool:
    """Whether a set of the same files is cut as ``shard_size`` would cut it (litdata: always)."""
    return fmt == "litdata" or [s["samples"] for s in held.get("shards", [])] == _shard_counts(n, shard_size)


def _in_place(held: dict[str, Any] | None, fmt: str, file_hash: str, n: int, shard_size: int) -> bool:
    """Whether a split is written in place: its folder holds nothing, or this set unfinished, or this
    set complete and cut the same way (anything else is written aside and swapped in)."""
    return held is None or (_same_data(held, fmt, file_hash) and held["state"] != "swapping"
                            and (held["state"] == "unfinished" or _same_layout(held, n, fmt, shard_size)))  # fmt: skip


def _move(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` atomically (a hard link, else a copy) and remove ``source``."""
    if not atomic_link(source, target):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    source.unlink()


def _swap_in(folder: Path) -> dict[str, Any]:
    """Replace the set in ``folder`` by the complete one in ``folder/.overwrite`` (module docstring)."""
    staging = folder / STAGING
    manifest = _read_json(staging / MANIFEST)
    if manifest is None:
        raise UserError(f"{staging / MANIFEST} is unreadable: remove {staging} and run the command again")
    (folder / MANIFEST).unlink(missing_ok=True)  # from here readers refuse the folder as unfinished
    new = _set_files(staging, manifest)
    for name in sorted(new):
        if (staging / name).is_file():  # not moved yet (a rerun finishes an interrupted swap)
            _move(staging / name, folder / name)
    for name in _shard_files(folder) - new:
        (folder / name).unlink()
    (folder / PARTIAL_MANIFEST).unlink(missing_ok=True)
    _move(staging / MANIFEST, folder / MANIFEST)  # the new set is complete: readers take it
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _remove_set(folder: Path) -> None:
    """Remove the shards in ``folder`` (a data set the new one replaces); its manifest goes last, so
    a run killed halfway leaves a folder the readers refuse, not a smaller data set."""
    shutil.rmtree(folder / STAGING, ignore_errors=True)
    for name in [*_shard_files(folder), PARTIAL_MANIFEST, MANIFEST]:
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _write_one(
    dataset: ImageFileDataset, target: Path, root: Path, file_hash: str, fmt: str, shard_size: int, chunk_bytes: str
) -> dict[str, Any]:
    """One split into ``target``: in place when it holds nothing or this set, else staged and swapped in."""
    held, staging = _held(target), target / STAGING
    if held is not None and held.get("state") == "swapping" and _same_data(held, fmt, file_hash):
        return _swap_in(target)  # an interrupted swap of this very set: finish it
    if _in_place(held, fmt, file_hash, len(dataset), shard_size):
        shutil.rmtree(staging, ignore_errors=True)  # an abandoned replacement of another set
        if fmt == "litdata" and held is not None and held["state"] == "complete":
            log.info("%s is complete already", target)
            manifest = held
            manifest.pop("state")
        elif fmt == "webdataset":
            manifest = write_webdataset(dataset, target, root, shard_size, file_hash)
        else:
            manifest = write_litdata(dataset, target, root, chunk_bytes, file_hash)
        for name in _shard_files(target) - _set_files(target, manifest):
            (target / name).unlink()  # another set's (write_shards: only with --overwrite) or an unfinished run's
        return manifest
    staged = _held(staging)
    if staged is not None and not (_same_data(staged, fmt, file_hash) and (
            staged["state"] == "unfinished" or _same_layout(staged, len(dataset), fmt, shard_size))):  # fmt: skip
        shutil.rmtree(staging)  # a replacement by yet another set, never swapped in
    if not (staging / MANIFEST).is_file():
        if fmt == "webdataset":
            write_webdataset(dataset, staging, root, shard_size, file_hash)
        else:
            write_litdata(dataset, staging, root, chunk_bytes, file_hash)
    return _swap_in(target)


def write_shards(
    root: Path, out: Path, fmt: str = "webdataset", shard_size: int = 1000, chunk_bytes: str = "64MB",
    overwrite: bool = False,
) -> dict[str | None, dict[str, Any]]:  # fmt: skip
    """Shard ``root`` into ``out`` (one sub-folder per split, see :func:`open_shard_source`), so
    that ``out`` holds this one data set; returns ``{split: manifest}``.

    ``out`` and its ``train/``, ``val/``, ``test/`` may hold only this data set (the same file list
    and format: resumed in place, or re-cut with another ``shard_size`` through the staging route);
    anything else (another source or format, shard files without a manifest, stray shard files
    beside this set's) raises :class:`UserError` unless ``overwrite``, which replaces it as the
    module docstring says and removes a split folder the new set does not have.
    """
    check_writable(out, "--out")
    sources = open_shard_source(root)
    targets = {split: out / split if split else out for split in sources}
    hashes = {split: file_list_hash(dataset, root) for split, dataset in sources.items()}
    by_folder = {folder: split for split, folder in targets.items()}
    conflicts: list[tuple[Path, str]] = []
    for folder in (out, *(out / s for s in SPLITS)):
        held = _held(folder)
        if held is None:
            continue
        split = by_folder.get(folder, "-")
        if held.get("unknown"):
            conflicts.append((folder, f"{folder}: {len(_shard_files(folder))} shard file(s) without a readable {MANIFEST}"))
        elif split == "-" or not _same_data(held, fmt, hashes[split]):
            what = f"{held.get('samples', '?')} samples" if held["state"] == "complete" else "an unfinished write"
            conflicts.append((folder, f"{folder}: {what} of {held.get('source')} ({held.get('format', 'webdataset')})"))
        elif held["state"] == "complete" and (stray := sorted(_shard_files(folder) - _set_files(folder, held))):
            # this set, beside files its manifest does not list (left by another set): not ours to delete unasked
            conflicts.append((folder, f"{folder}: {len(stray)} shard file(s) that are not of this data set "
                                      f"({', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''})"))  # fmt: skip
    if conflicts and not overwrite:
        lines = "\n  ".join(text for _, text in conflicts)
        raise UserError(
            f"--out {out} already holds another data set:\n  {lines}\nA shard folder holds one data set (fit and "
            "knn would read both). Run the same command with --overwrite to replace it (the new set is written "
            "beside the old one, which is removed once the new one is complete), or choose another --out."
        )
    manifests = {split: _write_one(dataset, targets[split], root, hashes[split], fmt, shard_size, chunk_bytes)
                 for split, dataset in sources.items()}  # fmt: skip
    for folder, _ in conflicts:
        if folder not in by_folder:
            _remove_set(folder)  # e.g. out/val of the old set, when the new one has none
    return manifests
