"""PNG contact sheets of attention maps and patch PCA (PIL; matplotlib only for its colour map).

Every sheet is a grid of equal tiles on a white background: ``PAD`` px around and between
tiles, a ``LABEL_H`` px caption strip above each tile. A tile is the input crop ``[H, W]``
enlarged by the integer factor ``tile_scale(H, W)`` (nearest, so small inputs such as 32 px
Fashion-MNIST stay legible); maps are upsampled to it patch by patch (nearest, one block per
patch, as DINO shows them). So a sheet of ``rows x cols`` tiles of ``tw x th`` px is
``cols*tw + (cols+1)*PAD`` wide and ``rows*(th+LABEL_H) + (rows+1)*PAD`` high
(:class:`SheetLayout`).

Attention sheet, ``rows=2``, ``cols=heads+2``:

    row 0: input | mean of heads | head 0 | ... | head h-1      (attention heat map over the image)
    row 1: masks of all heads, one colour each | mean mask | head 0 mask | ... (kept patches
           tinted cyan, the rest dimmed)

PCA sheet, ``rows=1``, ``cols=4``: input | first component | foreground | PCA RGB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 4
LABEL_H = 14
MIN_TILE = 160  # px of the shorter side of a tile, at least


@dataclass(frozen=True)
class SheetLayout:
    """Where the tiles of a sheet are (see the module docstring for the formula)."""

    rows: int
    cols: int
    tile_w: int
    tile_h: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet in px."""
        return (self.cols * self.tile_w + (self.cols + 1) * PAD,
                self.rows * (self.tile_h + LABEL_H) + (self.rows + 1) * PAD)  # fmt: skip

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the tile image at ``row, col`` (its caption is above it)."""
        left = PAD + col * (self.tile_w + PAD)
        top = PAD + row * (self.tile_h + LABEL_H + PAD) + LABEL_H
        return left, top, left + self.tile_w, top + self.tile_h


def tile_scale(height: int, width: int, min_tile: int = MIN_TILE) -> int:
    """Integer enlargement that makes the shorter side of a tile at least ``min_tile`` px."""
    return max(1, math.ceil(min_tile / max(1, min(height, width))))


def attention_layout(height: int, width: int, heads: int) -> SheetLayout:
    s = tile_scale(height, width)
    return SheetLayout(rows=2, cols=heads + 2, tile_w=width * s, tile_h=height * s)


def pca_layout(height: int, width: int) -> SheetLayout:
    s = tile_scale(height, width)
    return SheetLayout(rows=1, cols=4, tile_w=width * s, tile_h=height * s)


@lru_cache(maxsize=4)
def _colormap(name: str) -> np.ndarray:
    from matplotlib import colormaps  # noqa: PLC0415 - only the lookup table is needed

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)


def _upsample(grid_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[Hp, Wp, ...]`` to ``[height, width, ...]`` by repeating each patch (sizes divide exactly)."""
    ry, rx = height // grid_map.shape[0], width // grid_map.shape[1]
    return np.repeat(np.repeat(grid_map, ry, axis=0), rx, axis=1)


def _enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    return _upsample(pixels, pixels.shape[0] * scale, pixels.shape[1] * scale).astype(np.float32)


def heat_tile(image: np.ndarray, grid_map: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``grid_map [Hp, Wp]`` min-max scaled, coloured (inferno) and blended over ``image [h, w, 3]``."""
    m = grid_map.astype(np.float64)
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
    heat = _colormap("inferno")[np.round(m * 255).astype(int)]
    return (1 - alpha) * image + alpha * _upsample(heat, *image.shape[:2])


MASK_COLOUR = np.array([0.0, 200.0, 255.0], dtype=np.float32)


def mask_tile(image: np.ndarray, mask: np.ndarray, dim: float = 0.3, tint: float = 0.4) -> np.ndarray:
    """``image`` with the patches in ``mask [Hp, Wp]`` tinted (visible on dark images too) and the
    others dimmed to ``dim`` of their brightness."""
    keep = _upsample(mask.astype(np.float32), *image.shape[:2])[..., None]
    return keep * ((1 - tint) * image + tint * MASK_COLOUR) + (1 - keep) * dim * image


def heads_tile(image: np.ndarray, masks: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Every head's mask ``[heads, Hp, Wp]`` in its own colour (overlaps averaged) over ``image``."""
    colours = _colormap("tab10")[np.linspace(0, 255, 10).astype(int)]
    colours = colours[np.arange(masks.shape[0]) % 10]  # [heads, 3]
    count = masks.sum(axis=0).astype(np.float32)  # [Hp, Wp]
    mix = np.einsum("hyx,hc->yxc", masks.astype(np.float32), colours) / np.maximum(count, 1)[..., None]
    covered = _upsample((count > 0).astype(np.float32), *image.shape[:2])[..., None]
    mix = _upsample(mix, *image.shape[:2])
    return image * (1 - alpha * covered) + alpha * covered * mix


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def compose(layout: SheetLayout, tiles: Sequence[tuple[str, np.ndarray | None]]) -> Image.Image:
    """Place ``(caption, tile [th, tw, 3] float 0..255)`` row by row; a None tile stays blank."""
    sheet = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for i, (caption, tile) in enumerate(tiles):
        row, col = divmod(i, layout.cols)
        left, top, _, _ = layout.box(row, col)
        draw.text((left + 1, top - LABEL_H + 1), caption, fill=(0, 0, 0), font=font)
        if tile is not None:
            sheet.paste(Image.fromarray(np.clip(np.round(tile), 0, 255).astype(np.uint8)), (left, top))
    return sheet


def render_attention_sheet(
    pixels: np.ndarray, attention: np.ndarray, masks: np.ndarray, mean_mask: np.ndarray, threshold: float
) -> Image.Image:
    """The attention sheet of one image (layout in the module docstring).

    pixels ``[H, W, 3]`` uint8; attention ``[heads, Hp, Wp]``; masks bool ``[heads, Hp, Wp]``;
    mean_mask bool ``[Hp, Wp]`` (the mask of the mean of the heads).
    """
    heads = attention.shape[0]
    layout = attention_layout(pixels.shape[0], pixels.shape[1], heads)
    image = _enlarge(pixels, layout.tile_w // pixels.shape[1])
    pct = f"{threshold:.0%}"
    top = [("input", image), ("mean of heads", heat_tile(image, attention.mean(axis=0)))]
    top += [(f"head {h}", heat_tile(image, attention[h])) for h in range(heads)]
    bottom = [(f"masks {pct}, all heads", heads_tile(image, masks)), (f"mean mask {pct}", mask_tile(image, mean_mask))]
    bottom += [(f"head {h} mask", mask_tile(image, masks[h])) for h in range(heads)]
    return compose(layout, top + bottom)


def render_pca_sheet(pixels: np.ndarray, first: np.ndarray, foreground: np.ndarray, rgb: np.ndarray) -> Image.Image:
    """The PCA sheet of one image: pixels ``[H, W, 3]`` uint8, first ``[Hp, Wp]`` 0..1,
    foreground bool ``[Hp, Wp]``, rgb ``[Hp, Wp, 3]`` 0..1."""
    layout = pca_layout(pixels.shape[0], pixels.shape[1])
    image = _enlarge(pixels, layout.tile_w // pixels.shape[1])
    gray = np.repeat(first[..., None] * 255.0, 3, axis=-1)
    tiles = [("input", image), ("PCA 1", _upsample(gray, *image.shape[:2])),
             ("foreground", mask_tile(image, foreground)),
             ("PCA 1-3 as RGB", _upsample(rgb * 255.0, *image.shape[:2]))]  # fmt: skip
    return compose(layout, tiles)


def stack_sheets(sheets: Sequence[Image.Image]) -> Image.Image:
    """Sheets one under another (left-aligned; each brings its own margins): one image for TensorBoard."""
    width = max(s.width for s in sheets)
    out = Image.new("RGB", (width, sum(s.height for s in sheets)), (255, 255, 255))
    y = 0
    for s in sheets:
        out.paste(s, (0, y))
        y += s.height
    return out
