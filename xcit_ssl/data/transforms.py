"""Image transforms: DINO's multi-crop augmentation and the evaluation transform.

Everything runs on uint8 tensors (torchvision transforms v2): the decoded image is turned into a
``[3, H, W]`` uint8 tensor once, every view is cropped, resized (bicubic, antialiased), jittered,
blurred and solarized in uint8, and only the final step converts to float and normalises. Two
reasons: solarize then keeps DINO's uint8 semantics (threshold 128, ``x >= 128 -> 255 - x``)
without rescaling the threshold, and torchvision has native uint8 bicubic resize on CPU.

DINO's per-view recipe (facebookresearch/dino ``DataAugmentationDINO``; REFERENCE.md §2):

=============  =================================================================================
every view     RandomResizedCrop(bicubic), flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
               grayscale p=0.2
global view 1  Gaussian blur p=1.0
global view 2  Gaussian blur p=0.1, solarize p=0.2 (threshold 128)
local views    Gaussian blur p=0.5
=============  =================================================================================

Our own kernels (:mod:`xcit_ssl.data.photometric_kernels`): the blur's kernel size rule
(:func:`blur_kernel_size`, +-3 sigma_max, capped at the crop) and the two most expensive steps,
``SeparableGaussianBlur`` and ``ColorJitterFastHue``, same arguments and random parameters as
torchvision's, the same result to +-1 grey level, faster.
"""

from __future__ import annotations

from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from xcit_ssl.data.photometric_kernels import (
    SOLARIZE_THRESHOLD,
    ColorJitterFastHue,
    SeparableGaussianBlur,
    blur_kernel_size,
)
from xcit_ssl.errors import UserError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "MultiCropTransform",
    "build_eval_transform",
    "crop_resize_flip",
]


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise UserError(
            f"{name}={tuple(scale)} is not a valid crop-area range: use 0 < min <= max <= 1 "
            "(DINO: global (0.4, 1.0), local (0.05, 0.4))."
        )


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise UserError(f"{name}={p} is not a probability: use a value in [0, 1].")


CROP_RATIO: list[float] = [3.0 / 4.0, 4.0 / 3.0]  # RandomResizedCrop's aspect-ratio range (its default)


def crop_resize_flip(pixels: Tensor, size: int, scale: tuple[float, float]) -> Tensor:
    """One geometric view of a uint8 ``[C, H, W]`` image: random resized crop (bicubic, antialiased,
    as ``v2.RandomResizedCrop``) then a horizontal flip with p = 0.5, on a plain tensor.

    The same pixels as the ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip])`` of the
    per-image views for the same RNG state (torchvision's own box sampler, which draws as v2's
    ``RandomResizedCrop`` does; tested bit for bit), without v2's per-call dispatch (less CPU for
    the four views of a 32-px Fashion-MNIST image; benchmarks/BENCHMARKS.md, "The demo's CPU hot spots")."""
    top, left, h, w = transforms.RandomResizedCrop.get_params(pixels, list(scale), CROP_RATIO)
    view = v2.functional.resized_crop(
        pixels, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    if torch.rand(1) < 0.5:
        view = view.flip(-1)
    return view


class MultiCropTransform(nn.Module):
    """DINO multi-crop: 2 global views then ``n_local_crops`` local views of one image.

    Called on a PIL image (any mode; converted to RGB) or a uint8 tensor ``[3, H, W]``, it
    returns ``list[Tensor]``: two ``[3, G, G]`` float tensors (G = ``global_crop_size``) followed
    by ``n_local_crops`` tensors ``[3, L, L]`` (L = ``local_crop_size``), normalised with
    ``mean``/``std``. The defaults are DINO's ImageNet recipe; the probabilities are arguments so
    that a recipe can state them and tests can force them, not because they need tuning.

    Args:
        global_crop_size: side of the two global views in pixels.
        local_crop_size: side of the local views in pixels.
        n_local_crops: number of local views (0 for global views only).
        global_crop_scale: RandomResizedCrop area range of the global views.
        local_crop_scale: RandomResizedCrop area range of the local views.
        mean: per-channel normalisation mean (RGB, 0..1 scale).
        std: per-channel normalisation std.
        blur_sigma: Gaussian blur sigma range in output pixels, sampled uniformly per view.
        blur_probs: blur probability of (global view 1, global view 2, local views).
        solarize_prob: solarize probability of global view 2 (the only view DINO solarizes).
        color_jitter_prob: probability of colour jitter on every view.
        color_jitter: the jitter's strengths (brightness, contrast, saturation, hue), DINO's
            (0.4, 0.4, 0.2, 0.1); 0 leaves that operation out (not drawn, not computed). On
            grayscale data (Fashion-MNIST's three equal channels) saturation, hue and grayscale
            are identities, and a recipe sets them to 0 to save their time.
        grayscale_prob: probability of converting a view to (3-channel) grayscale.
        photometric: ``per_image`` (everything here, float views) or ``device``: only the geometry
            here (crop, resize, flip), ``uint8`` views; jitter, grayscale, blur, solarize and
            normalisation run batched on the training device after the transfer
            (:mod:`xcit_ssl.data.gpu_augment`, applied by the data module).
        photometric_compile: with ``photometric="device"``, fuse the batched half with
            ``torch.compile`` (a few graphs per view size, compiled at the first batch; eager, with
            one warning, where compilation is unavailable). Pays where the photometric half is a
            large share of the step: ImageNet-sized views on a CPU (several times faster there).
    """

    def __init__(
        self,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        n_local_crops: int = 8,
        global_crop_scale: tuple[float, float] = (0.4, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        photometric: Literal["per_image", "device"] = "per_image",
        photometric_compile: bool = False,
    ) -> None:
        super().__init__()
        if photometric not in ("per_image", "device"):
            raise UserError(f"photometric={photometric!r}: use 'device' (batched after the transfer) or 'per_image'.")
        if photometric_compile and photometric != "device":
            raise UserError(
                "photometric_compile=true compiles the batched photometric half, which photometric='per_image' "
                "does not have: pass --data.train_transform.init_args.photometric device, or leave photometric_compile false."
            )
        if global_crop_size < 1 or local_crop_size < 1:
            raise UserError(
                f"crop sizes must be positive, got global_crop_size={global_crop_size}, "
                f"local_crop_size={local_crop_size}."
            )
        if n_local_crops < 0:
            raise UserError(f"n_local_crops={n_local_crops} must be >= 0 (DINO: 8 or 10).")
        _check_scale("global_crop_scale", global_crop_scale)
        _check_scale("local_crop_scale", local_crop_scale)
        if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
            raise UserError(f"blur_sigma={tuple(blur_sigma)} must satisfy 0 < min <= max (DINO: (0.1, 2.0)).")
        for name, p in (
            ("blur_probs[0]", blur_probs[0]),
            ("blur_probs[1]", blur_probs[1]),
            ("blur_probs[2]", blur_probs[2]),
            ("solarize_prob", solarize_prob),
            ("color_jitter_prob", color_jitter_prob),
            ("grayscale_prob", grayscale_prob),
        ):
            _check_prob(name, p)
        jitter = tuple(float(j) for j in color_jitter)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise UserError(
                f"color_jitter={tuple(color_jitter)} must be 4 strengths (brightness, contrast, saturation, hue), "
                "each >= 0 and hue <= 0.5 (DINO: [0.4, 0.4, 0.2, 0.1]; 0 leaves an operation out)."
            )

        self.global_crop_size = global_crop_size
        self.local_crop_size = local_crop_size
        self.n_local_crops = n_local_crops
        self.global_crop_scale = (float(global_crop_scale[0]), float(global_crop_scale[1]))
        self.local_crop_scale = (float(local_crop_scale[0]), float(local_crop_scale[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.photometric = photometric
        self.photometric_compile = bool(photometric_compile)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_probs = tuple(float(p) for p in blur_probs)
        self.solarize_prob = float(solarize_prob)
        self.color_jitter_prob = float(color_jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.color_jitter = jitter

        # ToImage once per image: every view then crops the same uint8 tensor.
        self.to_image = v2.ToImage()
        self.global_view_1 = self._view(
            global_crop_size, global_crop_scale, blur_sigma, blur_probs[0], 0.0, color_jitter_prob, grayscale_prob
        )
        self.global_view_2 = self._view(
            global_crop_size,
            global_crop_scale,
            blur_sigma,
            blur_probs[1],
            solarize_prob,
            color_jitter_prob,
            grayscale_prob,
        )
        self.local_view = self._view(
            local_crop_size, local_crop_scale, blur_sigma, blur_probs[2], 0.0, color_jitter_prob, grayscale_prob
        )

    def _view(
        self,
        size: int,
        scale: tuple[float, float],
        blur_sigma: tuple[float, float],
        blur_prob: float,
        solarize_prob: float,
        color_jitter_prob: float,
        grayscale_prob: float,
    ) -> v2.Compose:
        steps: list[nn.Module] = [
            v2.RandomResizedCrop(
                size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(p=0.5),
        ]
        if self.photometric == "device":  # geometry only: uint8 views, the rest after the transfer
            return v2.Compose(steps)
        steps += [
            v2.RandomApply(
                [ColorJitterFastHue(*self.color_jitter)], p=color_jitter_prob
            ),
            v2.RandomGrayscale(p=grayscale_prob),
            v2.RandomApply(
                [SeparableGaussianBlur(blur_kernel_size(size, blur_sigma[1]), sigma=tuple(blur_sigma))],
                p=blur_prob,
            ),
        ]
        if solarize_prob > 0:
            # Still uint8 here, so the threshold is DINO's 128 on the 0..255 scale.
            steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_prob))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(self.mean), std=list(self.std))]
        return v2.Compose(steps)

    def forward(self, image: Image.Image | Tensor) -> list[Tensor]:
        """Return ``[global_1, global_2, local_1, ..., local_n]``; shapes [3,G,G] x2, [3,L,L] x n."""
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        # A plain tensor (not a TVTensor Image) would be treated as image anyway by v2; the
        # explicit wrap makes the intent independent of v2's pass-through heuristics.
        pixels = self.to_image(image)
        if self.photometric == "device":  # geometry only: the lean path, same pixels as the v2 views
            pixels = pixels.as_subclass(Tensor)
            size_g, size_l = self.global_crop_size, self.local_crop_size
            views = [crop_resize_flip(pixels, size_g, self.global_crop_scale) for _ in range(2)]
            views += [crop_resize_flip(pixels, size_l, self.local_crop_scale) for _ in range(self.n_local_crops)]
            return views
        views = [self.global_view_1(pixels), self.global_view_2(pixels)]
        views += [self.local_view(pixels) for _ in range(self.n_local_crops)]
        # Return plain tensors: TVTensor subclasses would survive default_collate and surprise
        # code downstream that checks types.
        return [v.as_subclass(Tensor) for v in views]

    def extra_repr(self) -> str:
        return (
            f"global_crop_size={self.global_crop_size}, local_crop_size={self.local_crop_size}, "
            f"n_local_crops={self.n_local_crops}"
        )


class EvalTransform:
    """DINO's evaluation transform: RGB, resize the shorter side, center crop, scale to [0, 1], normalise.

    The same torchvision v2 kernels as ``v2.Compose([RGB, ToImage, Resize, CenterCrop, ToDtype,
    Normalize, ToPureTensor])``, called directly on plain tensors: a PIL image skips the Compose's
    per-transform tv_tensor wrapping and pytree walks, which cost more than the arithmetic on small
    images (28-32 px Fashion-MNIST: 0.37 ms an image through the Compose). Other inputs (uint8
    tensors, tv_tensors) go through the Compose itself. Picklable, for DataLoader workers.
    """

    def __init__(self, resize_size: int, crop_size: int, mean: list[float], std: list[float], mode: InterpolationMode) -> None:
        self.resize_size, self.crop_size, self.mean, self.std, self.mode = resize_size, crop_size, mean, std, mode
        self.compose = v2.Compose(
            [
                v2.RGB(),
                v2.ToImage(),
                v2.Resize(resize_size, interpolation=mode, antialias=True),
                v2.CenterCrop(crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=mean, std=std),
                v2.ToPureTensor(),
            ]
        )

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if not isinstance(image, Image.Image):
            return self.compose(image)
        pixels = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
        pixels = TF.resize(pixels, [self.resize_size], interpolation=self.mode, antialias=True)
        pixels = TF.center_crop(pixels, [self.crop_size, self.crop_size])
        return TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), mean=self.mean, std=self.std)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(resize_size={self.resize_size}, crop_size={self.crop_size}, mean={self.mean}, "
            f"std={self.std}, interpolation={self.mode.value})"
        )


def build_eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    interpolation: Literal["bilinear", "bicubic"] = "bicubic",
) -> EvalTransform:
    """DINO's evaluation transform: resize the shorter side, center crop, normalise.

    Maps a PIL image (converted to RGB) or uint8 tensor to a float tensor ``[3, crop, crop]``.
    DINO k-NN / linear: 256 -> 224, bicubic. Supervised XCiT numbers use crop ratio 1.0
    (224 -> 224).
    """
    if resize_size < crop_size:
        raise UserError(
            f"eval resize_size={resize_size} is smaller than crop_size={crop_size}: the center crop "
            "would pad with black. Use resize_size >= crop_size (DINO: 256 -> 224)."
        )
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}.get(interpolation)
    if mode is None:
        raise UserError(f"interpolation={interpolation!r} is not supported: use 'bicubic' or 'bilinear'.")
    return EvalTransform(resize_size, crop_size, [float(m) for m in mean], [float(s) for s in std], mode)
