"""DINOv2-style patch-feature PCA: what the patch tokens of a set of images have in common.

1. One PCA over the patch tokens ``[N_i, D]`` of all images together; the first component,
   min-max scaled to 0..1 over all patches, separates foreground (above ``fg_threshold``;
   by default its mean, i.e. the positive side of the centred component) from background. Its
   sign is arbitrary, so it is oriented to make the image-border patches the low side (objects
   are rarely cut by every border).
2. A second PCA over the foreground patches alone; its first three components, each min-max
   scaled over the foreground patches of all images, are the R, G, B of each patch. Background
   patches are black.

Colours mean something only across the images of one call: the same part of similar objects
gets the same colour when the features encode it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PatchPCA:
    """Per image: ``first`` the scaled first component ``[Hp, Wp]`` (0..1), ``foreground`` bool
    ``[Hp, Wp]``, ``rgb`` the foreground's three components ``[Hp, Wp, 3]`` (0..1, black background)."""

    first: list[Tensor]
    foreground: list[Tensor]
    rgb: list[Tensor]


def _components(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(mean ``[D]``, top-``k`` principal directions ``[k, D]``, zero rows when rank < k)."""
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    dirs = torch.zeros(k, x.shape[1], dtype=x.dtype)
    dirs[: min(k, vh.shape[0])] = vh[:k]
    return mean, dirs


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _border(grid: tuple[int, int]) -> Tensor:
    hp, wp = grid
    mask = torch.zeros(hp, wp, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask.reshape(-1)


def patch_pca(
    tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]], fg_threshold: float | None = None
) -> PatchPCA:
    """PCA of the patch tokens of several images (``tokens[i]`` ``[Hp_i * Wp_i, D]``, row-major)."""
    if len(tokens) != len(grids) or not tokens:
        raise ValueError("give one grid per token tensor, and at least one image")
    sizes = [t.shape[0] for t in tokens]
    x = torch.cat([t.detach().double().cpu() for t in tokens])
    mean, dirs = _components(x, 1)
    first = (x - mean) @ dirs[0]
    border = torch.cat([_border(g) for g in grids])
    inner = ~border
    if inner.any() and first[border].mean() > first[inner].mean():
        first = -first
    first = _minmax(first[:, None])[:, 0]
    fg = first > (first.mean() if fg_threshold is None else fg_threshold)
    if int(fg.sum()) < 3:  # nothing stands out: colour every patch rather than none
        fg = torch.ones_like(fg)
    fmean, fdirs = _components(x[fg], 3)
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    rgb[fg] = _minmax((x[fg] - fmean) @ fdirs.T)
    out = PatchPCA(first=[], foreground=[], rgb=[])
    for f, m, c, grid in zip(first.split(sizes), fg.split(sizes), rgb.split(sizes), grids):
        out.first.append(f.float().reshape(grid))
        out.foreground.append(m.reshape(grid))
        out.rgb.append(c.float().reshape(*grid, 3))
    return out
