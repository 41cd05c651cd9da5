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

import logging
from pathlib import Path

from ..data.shard_writer import open_shard_source, write_litdata, write_webdataset
from ..data.shards import MANIFEST
from ..errors import UserError

logger = logging.getLogger(__name__)


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
    sources = open_shard_source(root)
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


__all__ = ["shard_main"]
