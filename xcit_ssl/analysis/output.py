"""What the analysis commands write (PNG sheets, .npy maps, JSON; atomically, through
:mod:`xcit_ssl.files`) and the output-folder check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import atomic_write, write_json


def save_png(path: Path, image: Image.Image) -> Path:
    with atomic_write(path, "wb") as fh:
        image.save(fh, format="PNG", optimize=True)
    return path


def save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_write(path, "wb") as fh:
        np.save(fh, array)
    return path


def save_json(path: Path, payload: dict[str, Any]) -> Path:
    write_json(path, payload)
    return path


def check_out_dir(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a folder that already holds files unless ``overwrite``; refuse a file in its place."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; give a folder path")
    if out.is_dir() and not overwrite:
        held = sum(1 for _ in out.iterdir())
        if held:
            raise UserError(f"{flag} {out} already holds {held} entries; pass --overwrite to replace the "
                            f"sheets there, or choose another {flag}")  # fmt: skip
