"""The sheets decode as PNG with the documented tile grid; the patch PCA finds a planted object."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from xcit_ssl.analysis.pca import patch_pca
from xcit_ssl.analysis.sheets import (
    LABEL_H,
    PAD,
    attention_layout,
    render_attention_sheet,
    render_pca_sheet,
    tile_scale,
)


def _roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


def test_attention_sheet_layout_of_a_non_square_image() -> None:
    h, w, heads, patch = 24, 40, 3, 8  # grid 3 x 5
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    attn = rng.random((heads, 3, 5)).astype(np.float32)
    masks = attn > 0.5
    sheet = _roundtrip(render_attention_sheet(pixels, attn, masks, masks[0], 0.6))
    s = tile_scale(h, w)
    assert s == 7  # shorter side 24 px -> at least 160 px
    cols, rows = heads + 2, 2
    assert sheet.format == "PNG"
    assert sheet.size == (cols * w * s + (cols + 1) * PAD, rows * (h * s + LABEL_H) + (rows + 1) * PAD)
    layout = attention_layout(h, w, heads)
    assert layout.size == sheet.size
    arr = np.asarray(sheet.convert("RGB"))
    left, top, right, bottom = layout.box(0, 0)
    input_tile = arr[top:bottom, left:right]
    np.testing.assert_array_equal(input_tile[::s, ::s], pixels)  # tile (0, 0) is the input, enlarged
    # row 1, column 2 is head 0's mask: its kept patches are tinted, the others dimmed
    left, top, right, bottom = layout.box(1, 2)
    tile = arr[top:bottom, left:right].astype(float).reshape(3, patch * s, 5, patch * s, 3)
    brightness = tile.mean(axis=(1, 3, 4))  # per patch [3, 5]
    assert brightness[masks[0]].min() > brightness[~masks[0]].max()
    gaps = arr[: layout.box(0, 0)[1] - LABEL_H]  # the top margin is white
    assert (gaps == 255).all()


def test_pca_sheet_layout() -> None:
    pixels = np.zeros((32, 32, 3), np.uint8)
    first = np.linspace(0, 1, 16).reshape(4, 4)
    sheet = _roundtrip(render_pca_sheet(pixels, first, first > 0.5, np.random.rand(4, 4, 3)))
    s = tile_scale(32, 32)
    assert sheet.size == (4 * 32 * s + 5 * PAD, 32 * s + LABEL_H + 2 * PAD)


def test_patch_pca_separates_a_planted_object_and_colours_only_it() -> None:
    torch.manual_seed(0)
    d, grids = 16, [(6, 6), (4, 8)]
    tokens = []
    for hp, wp in grids:
        t = torch.randn(hp, wp, d) * 0.1
        t[1:-1, 2:-1] += torch.linspace(0, 3, d)  # the "object": a shared direction, away from the border
        t[1:-1, 2:-1, 0] += torch.randn(hp - 2, wp - 3)  # and variation inside it
        tokens.append(t.reshape(-1, d))
    fit = patch_pca(tokens, grids)
    for (hp, wp), fg, rgb, first in zip(grids, fit.foreground, fit.rgb, fit.first):
        expected = torch.zeros(hp, wp, dtype=torch.bool)
        expected[1:-1, 2:-1] = True
        assert torch.equal(fg, expected)  # oriented so the border is background
        assert rgb.shape == (hp, wp, 3) and (rgb[~fg] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
        assert 0 <= first.min() and first.max() <= 1
    assert max(r.max() for r in fit.rgb) == 1.0  # min-max per component over the foreground
