"""Atomic writes (a temporary file in the same folder, then a rename) and the output-folder check."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from ..errors import UserError


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it to ``path``:
    a reader sees the old file or the whole new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(path: Path, image: Image.Image) -> Path:
    return write_atomic(path, lambda fh: image.save(fh, format="PNG", optimize=True))


def save_npy(path: Path, array: np.ndarray) -> Path:
    return write_atomic(path, lambda fh: np.save(fh, array))


def save_json(path: Path, payload: dict[str, Any]) -> Path:
    return write_atomic(path, lambda fh: fh.write((json.dumps(payload, indent=2, default=str) + "\n").encode()))


def check_out_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a folder that already holds files unless ``overwrite``; refuse a file in its place."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; give a folder path")
    if out.is_dir() and not overwrite:
        held = sum(1 for _ in out.iterdir())
        if held:
            raise UserError(f"{flag} {out} already holds {held} entries; pass --overwrite to replace the "
                            f"sheets there, or choose another {flag}")  # fmt: skip
