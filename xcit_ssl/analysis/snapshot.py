"""From a backbone and a few images to attention and PCA sheets: the step the ``attention``
command and the :class:`~xcit_ssl.analysis.callback.AttentionSnapshots` callback share."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .attention import capture_class_attention, threshold_masks
from .pca import patch_pca
from .sheets import render_attention_sheet, render_pca_sheet

log = logging.getLogger(__name__)


@dataclass
class ImageAnalysis:
    """What one image yields. attention ``[heads, Hp, Wp]`` float32 (raw softmax weights of the
    patches); cls_weight ``[heads]`` (the CLS-to-CLS share); masks bool ``[heads, Hp, Wp]``;
    mean_mask bool ``[Hp, Wp]``; pca_rgb ``[Hp, Wp, 3]`` and the sheets (PCA ones when asked)."""

    attention: np.ndarray
    cls_weight: np.ndarray
    masks: np.ndarray
    mean_mask: np.ndarray
    attention_sheet: Image.Image
    pca_rgb: np.ndarray | None = None
    pca_sheet: Image.Image | None = None


def analyse_images(
    backbone: nn.Module,
    images: Sequence[Tensor],
    pixels: Sequence[np.ndarray],
    block: int = -1,
    threshold: float = 0.6,
    pca: bool = True,
    fg_threshold: float | None = None,
    batch_size: int = 16,
) -> list[ImageAnalysis]:
    """Attention (and PCA) sheets for normalised ``images[i] [3, H_i, W_i]`` shown as ``pixels[i]``.

    The backbone is used as it is (the caller picks eval mode and device); images of one size go
    through it together, ``batch_size`` at a time. The PCA is fitted over all the images.
    """
    param = next(backbone.parameters())
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_shape[tuple(img.shape)].append(i)
    captured: dict[int, tuple[Tensor, Tensor, Tensor, tuple[int, int]]] = {}
    for idx in by_shape.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            batch = torch.stack([images[i] for i in chunk]).to(param.device, param.dtype)
            cap = capture_class_attention(backbone, batch, block)
            for j, i in enumerate(chunk):
                captured[i] = (cap.attention[j].cpu(), cap.cls_weight[j].cpu(),
                               cap.patch_tokens[j].float().cpu(), cap.grid)  # fmt: skip
    results = []
    for i in range(len(images)):
        attn, cls_w, _, _ = captured[i]
        masks = threshold_masks(attn, threshold)
        mean_mask = threshold_masks(attn.mean(dim=0), threshold)
        sheet = render_attention_sheet(pixels[i], attn.numpy(), masks.numpy(), mean_mask.numpy(), threshold)
        results.append(ImageAnalysis(attn.numpy().astype(np.float32), cls_w.numpy(), masks.numpy(),
                                     mean_mask.numpy(), sheet))  # fmt: skip
    if pca:
        fit = patch_pca([captured[i][2] for i in range(len(images))], [captured[i][3] for i in range(len(images))],
                        fg_threshold)  # fmt: skip
        for i, res in enumerate(results):
            res.pca_rgb = fit.rgb[i].numpy()
            res.pca_sheet = render_pca_sheet(pixels[i], fit.first[i].numpy(), fit.foreground[i].numpy(), res.pca_rgb)
    log.debug("analysed %d images (block %d, threshold %.2f)", len(images), block, threshold)
    return results
