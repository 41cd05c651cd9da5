"""The photometric half of DINO's multi-crop, batched on the training device.

The CPU workers decode and do the geometry per image (random resized crop, bicubic resize, flip:
:class:`~xcit_ssl.data.transforms.MultiCropTransform` with ``photometric="device"``) and ship
``uint8`` views, 4x less host-to-device traffic than float. After the transfer, one
:class:`BatchedPhotometric` per view kind applies the rest of DINO's recipe to the whole batch at
once, on the GPU in a GPU run and in the training process in a CPU run:

- colour jitter with probability 0.8: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, the
  four in a random order per sample (torchvision's ``ColorJitter`` semantics; a strength of 0
  leaves its operation out);
- grayscale with probability 0.2 (3 equal channels);
- Gaussian blur with the view kind's probability and a per-sample sigma ~ U(0.1, 2.0) in output
  pixels, separable, reflect padding, the kernel of :func:`blur_kernel_size`;
- solarize (x >= 128 -> 255 - x) with the view kind's probability;
- normalisation with the recipe's mean/std.

Every random parameter is drawn per sample (:meth:`BatchedPhotometric.sample`), and
:meth:`BatchedPhotometric.apply` is a pure function of the images and those parameters: the tests
compare it with torchvision's per-image kernels given the same parameters (within one grey level;
hue within two). Values are brought back to integers after every step as the per-image pipeline's ``uint8``
arithmetic does (truncated after the blends as torchvision's uint8 kernels, rounded after hue and
blur as ours). No maintained library matches these semantics batched with
per-sample parameters and orders (kornia's ``ColorJitter`` applies one fixed order to the batch
and blurs with a per-batch sigma), so the kernels are ours, written with plain tensor ops
(:mod:`xcit_ssl.data.photometric_kernels`; the fused, compiled form of the same steps is here).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from xcit_ssl.data.photometric_kernels import (
    SOLARIZE_THRESHOLD,
    blend,
    blur,
    blur_columns,
    blur_kernel_size,
    blur_rows,
    blur_taps,
    gray,
    hue_shift,
)
from xcit_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BatchedPhotometric", "PhotometricParams", "augment_views", "device_augmentations"]

logger = logging.getLogger(__name__)


@dataclass
class PhotometricParams:
    """Per-sample random parameters of one batch of one view kind (all tensors of length B)."""

    jitter: Tensor  # bool: colour jitter applied
    brightness: Tensor  # factors
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # turns in [-0.1, 0.1]
    order: Tensor  # [B, 4] permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
    grayscale: Tensor  # bool
    blur: Tensor  # bool
    sigma: Tensor  # blur sigma in pixels
    solarize: Tensor  # bool


def _fused_blend(x: Tensor, kind: Tensor, factors: Tensor) -> Tensor:
    """The blends of one colour-jitter position for the whole batch: per sample ``kind`` 0
    brightness, 1 contrast, 2 saturation, else unchanged (3, hue, is :func:`_fused_hue`'s),
    ``factors`` ``[B, 4]``. The three are one blend ``f x + (1 - f) other`` with ``other`` = 0,
    the image's mean luma or the pixel's luma, so a position costs one blend per pixel."""
    shape = (-1, 1, 1, 1)
    kind = kind.view(shape)
    factor = torch.where(kind == 0, factors[:, 0].view(shape), torch.where(kind == 1, factors[:, 1].view(shape), factors[:, 2].view(shape)))
    luma = gray(x)
    other = torch.where(kind == 1, luma.mean(dim=(1, 2, 3), keepdim=True), luma) * (kind != 0)
    blended = blend(x, other, factor.flatten()).floor()
    return torch.where((kind >= 0) & (kind <= 2), blended, x)


def _fused_hue(x: Tensor, turns: Tensor) -> Tensor:
    """The hue shift of the samples whose order puts it at this position (a gathered subset)."""
    return hue_shift(x, turns, fast_mod=True).clamp(0.0, 255.0)


def _fused_gray(x: Tensor, grayscale: Tensor) -> Tensor:
    return torch.where(grayscale.view(-1, 1, 1, 1), gray(x).expand(-1, 3, -1, -1), x)


def _fused_columns(rows: Tensor, taps: Tensor) -> Tensor:
    """The blur's vertical pass, rounded, for the gathered samples that blur."""
    return blur_columns(rows, taps).round()


def _fused_finish(x: Tensor, solarize: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Solarize and normalise."""
    x = torch.where(solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
    return (x - mean) / std


def fused_apply(
    views: Tensor,
    jitter: Tensor,
    factors: Tensor,
    order: Tensor,
    grayscale: Tensor,
    blur_on: Tensor,
    sigma: Tensor,
    solarize: Tensor,
    mean: Tensor,
    std: Tensor,
    kernel: int,
    graphs: dict[str, Callable[..., Tensor]] | None = None,
) -> Tensor:
    """:meth:`BatchedPhotometric.apply` as a few graphs for ``torch.compile`` (same parameters,
    same values within float rounding).

    Each jitter position is one blend over the whole batch (brightness, contrast and saturation
    selected per sample, :func:`_fused_blend`) plus the hue shift of the samples that take it there,
    gathered; the blur runs on the gathered samples that blur; grayscale and solarize/normalise are
    whole-batch graphs. ``factors`` is ``[B, 4]`` (brightness, contrast, saturation, hue); the rest
    as :class:`PhotometricParams`. ``graphs``: the compiled ``blend``, ``hue``, ``gray``, ``rows``,
    ``columns`` and ``finish`` (default: the eager functions). Each graph's output is written once
    and read by the next: in one graph, Inductor inlines earlier steps into later loops and
    recomputes them (each jitter position inside the next, the horizontal blur pass 13 times inside
    the vertical one), and the reflect padding, fused, becomes per-element index arithmetic that
    does not vectorise.
    """
    g = graphs or {"blend": _fused_blend, "hue": _fused_hue, "gray": _fused_gray, "rows": blur_rows, "columns": _fused_columns,
                   "finish": _fused_finish}  # fmt: skip
    x = views.float()
    for position in range(4):
        kind = torch.where(jitter, order[:, position], -1)
        x = g["blend"](x, kind, factors)
        idx = torch.nonzero(kind == 3).flatten()  # about a fifth of the batch at each position
        if idx.numel():
            x[idx] = g["hue"](x[idx], factors[idx, 3])
    x = g["gray"](x, grayscale)
    idx = torch.nonzero(blur_on).flatten()
    if kernel > 1 and idx.numel():
        half = kernel // 2
        taps = blur_taps(sigma[idx], kernel, x.dtype)
        rows = g["rows"](F.pad(x[idx], (half, half, half, half), mode="reflect"), taps)
        x[idx] = g["columns"](rows, taps)
    return g["finish"](x, solarize, mean, std)


_COMPILED: dict[str, Any] = {}  # "graphs": the compiled graphs; "failed": why compilation failed


def _compiled_fused_apply(args: tuple) -> Tensor | None:
    """``fused_apply(*args)`` through ``torch.compile`` (whole-batch graphs with static shapes, one
    per view size and batch; the gathered-subset graphs with a dynamic batch), or None, with one
    warning for the process, where compilation is unavailable or fails."""
    if "failed" in _COMPILED:
        return None
    try:
        if "graphs" not in _COMPILED:
            if not hasattr(torch, "compile"):
                raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
            whole = {"blend": _fused_blend, "gray": _fused_gray, "finish": _fused_finish}  # the whole batch
            subset = {"hue": _fused_hue, "rows": blur_rows, "columns": _fused_columns}  # gathered samples, any number
            graphs = {k: torch.compile(f, dynamic=False, fullgraph=True) for k, f in whole.items()}
            graphs.update({k: torch.compile(f, dynamic=True, fullgraph=True) for k, f in subset.items()})
            _COMPILED["graphs"] = graphs
            _COMPILED["seen"] = set()
        key = (tuple(args[0].shape), args[0].device.type, args[10])
        start = time.perf_counter()
        out = fused_apply(*args, graphs=_COMPILED["graphs"])
        if key not in _COMPILED["seen"]:
            _COMPILED["seen"].add(key)
            logger.info("compiled the batched photometric augmentation for views %s in %.1f s", list(key[0]), time.perf_counter() - start)
        return out
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager kernels
        message = str(err).strip().splitlines()
        _COMPILED["failed"] = f"{type(err).__name__}: {message[0] if message else ''}"
        logger.warning(
            "photometric_compile: torch.compile failed (%s); the batched photometric augmentation runs eagerly",
            _COMPILED["failed"],
        )
        return None


class BatchedPhotometric(nn.Module):
    """DINO's photometric augmentation of one view kind on a batch of ``uint8`` views.

    Args:
        size: the view side in pixels (sets the blur kernel, as the per-image pipeline).
        blur_prob, solarize_prob, color_jitter_prob, grayscale_prob: DINO's per-view probabilities.
        blur_sigma: sigma range in output pixels.
        mean, std: normalisation (0..1 scale).
        jitter: the colour jitter's strengths (brightness, contrast, saturation, hue); an operation
            of strength 0 is left out (as torchvision's ``ColorJitter`` leaves it out).
        compile: run :func:`fused_apply` through ``torch.compile`` instead of the eager
            :meth:`apply` (same parameters, same values within one grey level; eager with one
            warning where compilation fails). On a CPU the fused graph is several times faster
            (``benchmarks/bench_multicrop.py``); each view size compiles once, at its first batch.
    ``forward(views uint8 [B, 3, S, S]) -> float [B, 3, S, S]`` (normalised), parameters drawn from
    the device's default generator (the training process's RNG, restored on resume).
    """

    def __init__(
        self,
        size: int,
        blur_prob: float,
        solarize_prob: float = 0.0,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.compile = bool(compile)
        self.size = int(size)
        self.blur_prob, self.solarize_prob = float(blur_prob), float(solarize_prob)
        self.color_jitter_prob, self.grayscale_prob = float(color_jitter_prob), float(grayscale_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.kernel = blur_kernel_size(self.size, self.blur_sigma[1])
        self.jitter_strength = tuple(float(j) for j in jitter)
        self._active_ops = tuple(k for k in range(4) if self.jitter_strength[k] > 0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)

    def sample(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> PhotometricParams:
        """Draw every random parameter of a batch, per sample."""

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(batch, device=device, generator=generator) * (high - low) + low

        b, c, s, h = self.jitter_strength
        return PhotometricParams(
            jitter=torch.rand(batch, device=device, generator=generator) < self.color_jitter_prob,
            brightness=uniform(max(0.0, 1 - b), 1 + b),
            contrast=uniform(max(0.0, 1 - c), 1 + c),
            saturation=uniform(max(0.0, 1 - s), 1 + s),
            hue=uniform(-h, h),
            order=torch.rand(batch, 4, device=device, generator=generator).argsort(dim=1),
            grayscale=torch.rand(batch, device=device, generator=generator) < self.grayscale_prob,
            blur=torch.rand(batch, device=device, generator=generator) < self.blur_prob,
            sigma=uniform(*self.blur_sigma),
            solarize=torch.rand(batch, device=device, generator=generator) < self.solarize_prob,
        )

    def apply(self, views: Tensor, p: PhotometricParams) -> Tensor:
        """``uint8 [B, 3, S, S]`` and the batch's parameters -> normalised float ``[B, 3, S, S]``."""
        x = views.float()
        if bool(p.jitter.any()):
            for position in range(4):
                op = p.order[:, position]
                for kind in self._active_ops:
                    idx = torch.nonzero(p.jitter & (op == kind)).flatten()
                    if idx.numel():
                        x[idx] = self._jitter_op(kind, x[idx], p, idx)
        if bool(p.grayscale.any()):
            idx = torch.nonzero(p.grayscale).flatten()
            x[idx] = gray(x[idx]).expand(-1, 3, -1, -1)
        if bool(p.blur.any()):
            idx = torch.nonzero(p.blur).flatten()
            x[idx] = blur(x[idx], p.sigma[idx], self.kernel).round_()
        if bool(p.solarize.any()):
            sol = p.solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD)
            x = torch.where(sol, 255.0 - x, x)
        return (x - self.mean) / self.std

    @staticmethod
    def _jitter_op(kind: int, x: Tensor, p: PhotometricParams, idx: Tensor) -> Tensor:
        # torchvision's uint8 kernels truncate after every blend: floor keeps the results identical
        if kind == 0:  # brightness: blend with black
            return (x * p.brightness[idx].view(-1, 1, 1, 1)).clamp_(0.0, 255.0).floor_()
        if kind == 1:  # contrast: blend with the mean luma of the image
            mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
            return blend(x, mean, p.contrast[idx]).floor_()
        if kind == 2:  # saturation: blend with the luma image
            return blend(x, gray(x), p.saturation[idx]).floor_()
        return hue_shift(x, p.hue[idx]).clamp_(0.0, 255.0)

    def fused_args(self, views: Tensor, p: PhotometricParams) -> tuple:
        """The arguments of :func:`fused_apply` for these views and parameters."""
        factors = torch.stack([p.brightness, p.contrast, p.saturation, p.hue], 1)
        order = p.order
        if len(self._active_ops) < 4:  # an operation left out takes its turn as a no-op (-1)
            active = torch.tensor([s > 0 for s in self.jitter_strength], device=order.device)
            order = torch.where(active[order], order, -1)
        return (views, p.jitter, factors, order, p.grayscale, p.blur, p.sigma, p.solarize, self.mean, self.std, self.kernel)

    def forward(self, views: Tensor) -> Tensor:
        p = self.sample(views.shape[0], views.device)
        if self.compile:
            _check_uint8(views)
            out = _compiled_fused_apply(self.fused_args(views, p))
            if out is not None:
                return out
        return self.apply(views, p)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, blur_prob={self.blur_prob}, solarize_prob={self.solarize_prob}, "
            f"kernel={self.kernel}, sigma={self.blur_sigma}, jitter={self.jitter_strength}, compile={self.compile}"
        )


def _check_uint8(views: Tensor) -> None:
    if views.dtype != torch.uint8:
        raise TypeError(
            f"batched photometric augmentation expects uint8 views [B, 3, S, S], got {views.dtype}: the "
            "train transform must be MultiCropTransform(photometric='device')"
        )


def device_augmentations(transform: object) -> nn.ModuleList:
    """The three :class:`BatchedPhotometric` (global view 1, global view 2, local views) of a
    ``MultiCropTransform``, with its probabilities, sigma range and normalisation."""
    t = transform
    common = {"color_jitter_prob": t.color_jitter_prob, "grayscale_prob": t.grayscale_prob,  # type: ignore[attr-defined]
              "blur_sigma": t.blur_sigma, "mean": t.mean, "std": t.std,  # type: ignore[attr-defined]
              "jitter": getattr(t, "color_jitter", (0.4, 0.4, 0.2, 0.1)),
              "compile": getattr(t, "photometric_compile", False)}  # fmt: skip
    g, loc = t.global_crop_size, t.local_crop_size  # type: ignore[attr-defined]
    probs = t.blur_probs  # type: ignore[attr-defined]
    return nn.ModuleList([
        BatchedPhotometric(g, probs[0], 0.0, **common),
        BatchedPhotometric(g, probs[1], t.solarize_prob, **common),  # type: ignore[attr-defined]
        BatchedPhotometric(loc, probs[2], 0.0, **common),
    ])  # fmt: skip


def augment_views(views: list[Tensor], augmentations: nn.ModuleList) -> list[Tensor]:
    """Apply global 1 / global 2 / local augmentation to ``[g1, g2, l1, ..., ln]`` uint8 batches
    (the local views as one batch), returning normalised float views in the same order."""
    for v in views:
        _check_uint8(v)
    out = [augmentations[0](views[0]), augmentations[1](views[1])]
    if len(views) > 2:
        locals_ = augmentations[2](torch.cat(views[2:]))
        out += list(locals_.split(views[2].shape[0]))
    return out
