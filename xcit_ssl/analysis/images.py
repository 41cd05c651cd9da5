"""Images in, tensors out: find the files, decode them, resize keeping the aspect ratio.

A non-square image keeps its shape: the shorter side is resized to ``img_size`` (bicubic), then
each side is centre-cropped down to a multiple of the patch size, so a 300x200 photo at 224 / p16
becomes 336x224 (a 21x14 patch grid). Every decode error is a :class:`~xcit_ssl.errors.UserError`
naming the file, raised before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..data.images import IMAGE_EXTENSIONS
from ..errors import UserError


@dataclass
class PreparedImage:
    """One image ready for the backbone.

    tensor: normalised ``[3, H, W]`` (H, W multiples of the patch size); pixels: the same crop
    for display, ``[H, W, 3]`` uint8; source: the file it came from.
    """

    tensor: Tensor
    pixels: np.ndarray
    source: Path


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, and every image file (by suffix) under the folders named, sorted per folder.

    A file named explicitly is taken whatever its suffix (decoding tells whether it is an image).
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not inside:
                kinds = ", ".join(IMAGE_EXTENSIONS[:4])
                raise UserError(f"--images {path}: the folder holds no image files ({kinds}, ...)")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"--images {path}: no such file or folder")
    if not found:
        raise UserError("--images: give at least one image file or folder")
    return found


def open_image(path: Path) -> Image.Image:
    """Decode ``path`` fully as RGB; UserError if it is not an image PIL can read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"--images: {path} is not a readable image ({err.__class__.__name__}: {err}); "
                        "remove it or convert it to PNG/JPEG") from None  # fmt: skip


def resize_and_crop(img: Image.Image, img_size: int, patch_size: int) -> Image.Image:
    """Shorter side to ``img_size``, then each side centre-cropped to a multiple of ``patch_size``."""
    if img_size < patch_size:
        raise UserError(f"--img_size {img_size} is smaller than the patch size {patch_size}; use at least {patch_size}")
    w, h = img.size
    scale = img_size / min(w, h)
    nw, nh = max(img_size, round(w * scale)), max(img_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    cw, ch = nw - nw % patch_size, nh - nh % patch_size
    left, top = (nw - cw) // 2, (nh - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def prepare_image(
    img: Image.Image, img_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float], source: Path
) -> PreparedImage:
    """Resize/crop (see :func:`resize_and_crop`) and normalise with ``mean``/``std`` (0..1 scale)."""
    crop = resize_and_crop(img, img_size, patch_size)
    pixels = np.asarray(crop, dtype=np.uint8)
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
    tensor = (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return PreparedImage(tensor=tensor, pixels=pixels, source=source)


def denormalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``[B, 3, H, W]`` back to display pixels ``[B, H, W, 3]`` uint8."""
    x = images.detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
