"""Sharded data sets: WebDataset tar shards and litdata optimized chunks, read by index.

Both formats are read as map-style data sets (sample ``i`` of a split), so everything the image
folders have holds for shards too: the resumable training loader (:mod:`xcit_ssl.data.resumable`:
``StatefulDataLoader``, one seeded permutation per epoch sharded over the ranks, per-sample seeded
augmentation, exact mid-epoch resume), the same multi-crop and evaluation transforms, and the
skip-and-count policy for members that do not decode.

- **WebDataset** (``--data.dataset webdataset``): ``<root>/<split>/*.tar`` in the WebDataset
  convention (members ``<key>.<ext>``: an image ``jpg|jpeg|png|webp|...`` and optionally ``cls``
  holding the integer label). ``xcit-ssl shard`` (:mod:`xcit_ssl.data.shard_writer`) writes them
  with WebDataset's ``TarWriter`` and
  records every member's byte offset in ``manifest.json``; shards written by other tools are
  indexed once with ``tarfile`` when opened. A member is read with one seek and one read. A
  truncated shard keeps the members before the cut (they are counted, with a warning).
- **litdata** (``--data.dataset litdata``): ``<root>/<split>/`` written by ``litdata.optimize``
  (items ``{"image": bytes, "label": int}``); read through ``litdata.StreamingDataset``'s random
  access, which also reads the remote URLs litdata supports (``s3://``, ``gs://``, ...).

One folder, one data set. A folder with ``manifest.json`` is read only when its shard files are
exactly those the manifest lists (WebDataset: the ``*.tar`` files; litdata: the chunks its
``index.json`` lists, and as many samples as the manifest says): a stray shard of another data
set, or a missing one, stops the run with a message naming the files and the fix (``xcit-ssl shard
... --overwrite``) instead of training on a mixture. A folder that ``xcit-ssl shard`` has not
finished (``.manifest.partial.json``, or a replacement set in ``.overwrite/`` not yet swapped in,
and no ``manifest.json``) is refused the same way. Folders without a manifest (shards written by
other tools) are read as they are.

Distributed reading: each rank reads ``ceil(N / world)`` samples of one permutation; when ``N``
does not divide evenly the last ranks wrap around to the start of the permutation (PyTorch's
``DistributedSampler`` rule), so every rank runs the same number of steps and the union of what
the ranks read in an epoch is the whole data set (plus at most ``world - 1`` repeats).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xcit_ssl.data.images import IMAGE_EXTENSIONS, ImageFileDataset, load_rgb
from xcit_ssl.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = ".manifest.partial.json"  # an unfinished write: the shards complete so far
STAGING = ".overwrite"  # a replacement set being written (``--overwrite``), hidden until swapped in
SPLITS = ("train", "val", "test")  # the splits ``xcit-ssl shard`` writes sub-folders for
LABEL_EXTS = ("cls", "label", "cls.txt")


def split_folder(root: str | os.PathLike[str] | None, split: str | None) -> Path:
    """``root/split`` when it exists (labelled splits), else ``root`` (one unlabelled set)."""
    if root is None:
        raise UserError("Sharded data needs a folder: pass --data.root /path/to/shards (see `xcit-ssl shard`).")
    base = Path(root)
    if split and (base / split).is_dir():
        return base / split
    unsplit = (base / MANIFEST).is_file() or any(base.glob("*.tar")) or (base / "index.json").is_file()
    if split and (split != "train" or not unsplit):
        raise UserError(
            f"No shards for split '{split}' under {base}: expected {base / split}/*.tar or a litdata folder there "
            "(`xcit-ssl shard --root FOLDER --out DIR` writes one sub-folder per split)."
        )
    return base


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable manifest ({err}); write the shards again with `xcit-ssl shard`.")


def shard_command(folder: Path, manifest: dict[str, Any] | None) -> str:
    """The ``xcit-ssl shard`` command that writes ``folder`` again, replacing what it holds."""
    source, fmt = (manifest or {}).get("source"), (manifest or {}).get("format")
    split = folder.name in SPLITS and (source is None or (Path(source) / folder.name).is_dir())
    out, flags = (folder.parent if split else folder), (" --format litdata" if fmt == "litdata" else "")
    return f"xcit-ssl shard --root {source or 'IMAGE_FOLDER'} --out {out}{flags} --overwrite"


def refuse_unfinished(folder: Path) -> None:
    """Raise when ``folder`` has no manifest but an unfinished ``xcit-ssl shard`` run left its marks."""
    if (folder / MANIFEST).is_file():
        return
    partial = folder / PARTIAL_MANIFEST
    if partial.is_file() or (folder / STAGING).is_dir():
        try:
            marks = json.loads(partial.read_text()) if partial.is_file() else None
        except (OSError, ValueError):
            marks = None
        what = "a replacement set (.overwrite/) not yet swapped in" if (folder / STAGING).is_dir() else PARTIAL_MANIFEST
        raise UserError(
            f"{folder} is an unfinished `xcit-ssl shard` run ({what}, no {MANIFEST}): its shards are not one "
            f"complete data set. Run the same `xcit-ssl shard` command again to finish it, or replace the "
            f"folder with `{shard_command(folder, marks if isinstance(marks, dict) else None)}`."
        )


def check_shard_files(folder: Path, manifest: dict[str, Any], present: set[str], listed: Sequence[str]) -> None:
    """Raise unless the shard files ``present`` in ``folder`` are exactly those its manifest ``listed``."""
    stray = sorted(present - set(listed))
    missing = sorted(set(listed) - present)
    if not stray and not missing:
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = [f"{len(stray)} stray file(s) its {MANIFEST} does not list ({some(stray)})"] if stray else []
    parts += [f"{len(missing)} listed file(s) missing ({some(missing)})"] if missing else []
    raise UserError(
        f"{folder} does not hold exactly the data set its {MANIFEST} describes ({manifest.get('samples', '?')} "
        f"samples from {manifest.get('source', 'an unknown folder')}): {'; '.join(parts)}. Reading it would mix "
        f"two data sets or lose part of one. Write the folder again with `{shard_command(folder, manifest)}` "
        "(it removes every shard that is not of the new set)."
    )


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def index_tar(path: Path) -> tuple[list[list[Any]], bool]:
    """``[[key, ext, offset, size, label], ...]`` of the images in one tar shard, and whether it was cut short.

    Labels come from the sample's ``cls`` member (-1 when absent). A truncated or damaged shard
    keeps the samples indexed before the damage.
    """
    samples: dict[str, list[Any]] = {}
    truncated = False
    size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _member_key(member.name)
                entry = samples.setdefault(key, [key, None, 0, 0, -1])
                if f".{ext}" in IMAGE_EXTENSIONS:
                    entry[1], entry[2], entry[3] = ext, member.offset_data, member.size
                    if member.offset_data + member.size > size:
                        truncated = True
                elif ext in LABEL_EXTS:
                    raw = tar.extractfile(member)
                    text = raw.read().decode("utf-8", "replace").strip() if raw is not None else ""
                    entry[4] = int(text) if text.lstrip("-").isdigit() else -1
    except (tarfile.TarError, EOFError, OSError):
        truncated = True
    return [s for s in samples.values() if s[1] is not None], truncated


class WebDatasetShards(ImageFileDataset):
    """The images of the ``*.tar`` shards of one folder, by index (see the module docstring)."""

    def __init__(
        self, folder: str | os.PathLike[str], transform: Callable | None = None, classes: Sequence[str] | None = None
    ) -> None:
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            refuse_unfinished(folder)
        elif manifest.get("format") not in (None, "webdataset"):
            raise UserError(f"{folder} holds {manifest.get('format')} shards: pass --data.dataset {manifest['format']}.")
        shards = sorted(folder.glob("*.tar"))
        listed = {s["name"]: s for s in (manifest or {}).get("shards", [])}
        if manifest is not None and "shards" in manifest:
            check_shard_files(folder, manifest, {p.name for p in shards}, list(listed))
            shards = [folder / name for name in listed]  # the manifest's order is the samples' order
        if not shards:
            raise UserError(f"No .tar shards in {folder}: check --data.root, or write them with `xcit-ssl shard`.")
        self._shard_files = [str(p) for p in shards]
        rows: list[tuple[int, list[Any]]] = []
        self.num_truncated_shards = 0
        for i, shard in enumerate(shards):
            entry = listed.get(shard.name)
            if entry is not None and entry.get("bytes") == shard.stat().st_size:
                members = entry["members"]
            else:
                members, truncated = index_tar(shard)
                if truncated:
                    self.num_truncated_shards += 1
                    log.warning("Shard %s is truncated or damaged: reading its first %d samples.", shard, len(members))
            rows += [(i, m) for m in members]
        if not rows:
            raise UserError(f"The shards in {folder} hold no images: write them again with `xcit-ssl shard`.")
        self._shard = np.asarray([r[0] for r in rows], dtype=np.int32)
        self._offset = np.asarray([r[1][2] for r in rows], dtype=np.int64)
        self._size = np.asarray([r[1][3] for r in rows], dtype=np.int64)
        labels = np.asarray([r[1][4] for r in rows], dtype=np.int64)
        class_list = list(classes) if classes is not None else list((manifest or {}).get("classes") or [])
        if not class_list and (labels >= 0).any():
            class_list = [str(c) for c in range(int(labels.max()) + 1)]
        names = [f"{shards[r[0]].name}:{r[1][0]}.{r[1][1]}" for r in rows]
        self.root = folder
        super().__init__(names, labels, class_list, transform)

    def _load(self, index: int) -> Image.Image:
        with open(self._shard_files[int(self._shard[index])], "rb") as f:
            f.seek(int(self._offset[index]))
            data = f.read(int(self._size[index]))
        if len(data) < int(self._size[index]):
            raise OSError(f"member cut short ({len(data)} of {int(self._size[index])} bytes): truncated shard")
        return load_rgb(io.BytesIO(data))


class LitdataShards(ImageFileDataset):
    """The images of a litdata optimized folder (local or remote), by index."""

    def __init__(
        self, folder: str, transform: Callable | None = None, classes: Sequence[str] | None = None
    ) -> None:
        try:
            from litdata import StreamingDataset
        except ImportError:  # pragma: no cover - a declared dependency
            raise UserError("--data.dataset litdata needs the litdata package: pip install litdata") from None
        self._folder = str(folder)
        if "://" not in self._folder:
            refuse_unfinished(Path(folder))
        try:
            probe = StreamingDataset(self._folder)
        except Exception as err:  # noqa: BLE001 - litdata raises many kinds for a folder it cannot read
            raise UserError(
                f"{folder} is not a litdata optimized folder ({type(err).__name__}: {str(err)[:200]}): check "
                "--data.root, or write it with `xcit-ssl shard --format litdata`."
            ) from None
        size = len(probe)
        manifest = read_manifest(Path(folder)) if "://" not in self._folder else None
        if manifest is not None:
            _check_litdata_folder(Path(folder), manifest, size)
        if manifest is not None and len(manifest.get("labels", [])) == size:
            labels = np.asarray(manifest["labels"], dtype=np.int64)
        else:
            labels = np.asarray([int(probe[i].get("label", -1)) for i in range(size)], dtype=np.int64)
        class_list = list(classes) if classes is not None else list((manifest or {}).get("classes") or [])
        self._stream: Any = None
        self.root = folder
        super().__init__([f"{folder}#{i}" for i in range(size)], labels, class_list, transform)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stream"] = None  # each worker opens its own reader
        return state

    def _load(self, index: int) -> Image.Image:
        if self._stream is None:
            from litdata import StreamingDataset

            self._stream = StreamingDataset(self._folder)
        item = self._stream[index]
        return load_rgb(io.BytesIO(item["image"]))


def _check_litdata_folder(folder: Path, manifest: dict[str, Any], size: int) -> None:
    """Raise unless ``folder``'s chunks are exactly those its ``index.json`` lists and hold the
    manifest's sample count (otherwise ``index.json`` and ``manifest.json`` are of two data sets)."""
    try:
        listed = [c["filename"] for c in json.loads((folder / "index.json").read_text())["chunks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # StreamingDataset read it; a layout this check does not know is left to litdata
    check_shard_files(folder, manifest, {p.name for p in folder.glob("*.bin")}, listed)
    if manifest.get("samples") not in (None, size):
        raise UserError(
            f"{folder} holds {size} samples, its {MANIFEST} says {manifest['samples']}: the chunks and the manifest "
            f"are of two data sets. Write the folder again with `{shard_command(folder, manifest)}`."
        )


def open_shards(
    kind: str,
    root: str | os.PathLike[str] | None,
    split: str | None,
    transform: Callable | None = None,
    classes: Sequence[str] | None = None,
) -> ImageFileDataset:
    """One split of a sharded data set (``kind`` ``webdataset`` or ``litdata``)."""
    if kind == "litdata" and root is not None and "://" in str(root):
        return LitdataShards(f"{str(root).rstrip('/')}/{split}" if split else str(root), transform, classes)
    folder = split_folder(root, split)
    if kind == "webdataset":
        return WebDatasetShards(folder, transform, classes)
    return LitdataShards(str(folder), transform, classes)
