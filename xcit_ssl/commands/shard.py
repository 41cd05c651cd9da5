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

An output folder holds one data set: shards of another source (or format) there are refused
unless ``--overwrite``, which writes the new set beside the old one and, once it is complete, swaps
it in and removes every shard that is not of the new set (:mod:`xcit_ssl.data.shard_writer`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..data.shard_writer import write_shards
from ..errors import UserError
from ..files import check_writable

logger = logging.getLogger(__name__)
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]B?|B)", re.IGNORECASE)  # litdata's sizes: 64MB, 1.5G, 100k


def shard_main(argv: list[str]) -> int:
    """``xcit-ssl shard``: see the module docstring. Returns 0."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="xcit-ssl shard", default_meta=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=str, required=True, help="image folder (ImageNet layout, classes, or flat)")
    parser.add_argument("--out", type=str, required=True, help="output folder (one sub-folder per split)")
    parser.add_argument("--format", type=str, default="webdataset", help="webdataset (tar shards) or litdata")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per WebDataset shard")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="litdata chunk size")
    parser.add_argument(
        "--overwrite", type=bool, nargs="?", const=True, default=False,
        help="replace the data set --out holds (another source or format): the new set is written first, "
        "then every shard not of it is removed",
    )  # fmt: skip
    cfg = parser.parse_args(argv)
    if cfg.format not in ("webdataset", "litdata"):
        raise UserError(f"--format {cfg.format}: use webdataset or litdata")
    if cfg.shard_size < 1:
        raise UserError(f"--shard_size {cfg.shard_size}: use a positive number of samples")
    check_writable(Path(cfg.out).expanduser(), "--out")  # before reading a single image
    if not _SIZE.fullmatch(cfg.chunk_bytes.strip()):  # litdata would say so only after listing the images
        raise UserError(f"--chunk_bytes {cfg.chunk_bytes}: use a size such as 64MB (units B, KB, MB, GB, TB)")
    out = Path(cfg.out)
    manifests = write_shards(Path(cfg.root), out, cfg.format, cfg.shard_size, cfg.chunk_bytes, cfg.overwrite)
    for split, manifest in manifests.items():
        target = out / split if split else out
        what = f"{len(manifest['classes'])} classes" if manifest["classes"] else "unlabelled"
        print(f"{target}: {manifest['samples']} samples ({what}), {cfg.format}")
    return 0


__all__ = ["shard_main"]
