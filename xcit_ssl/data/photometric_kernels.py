"""Our own photometric kernels, per image and batched: the same results as torchvision's (to +-1
grey level, tested against it), faster. Data loading bounds DINO on a GPU host (about 20-40
images/s per core), and blur and hue are its two most expensive steps (figures:
benchmarks/BENCHMARKS.md).

Per image (the ``v2`` pipeline of :class:`~xcit_ssl.data.transforms.MultiCropTransform`):
:class:`SeparableGaussianBlur` and :class:`ColorJitterFastHue` are subclasses of their v2 transforms
(same arguments, same random parameters). Batched (``[B, 3, H, W]`` on the 0..255 scale, one random
parameter per sample, :mod:`xcit_ssl.data.gpu_augment`): :func:`gray`, :func:`blend`,
:func:`hue_shift` and the separable :func:`blur`. Both paths share :func:`blur_kernel_size` and
:data:`SOLARIZE_THRESHOLD`.

Blur kernel size. DINO blurs with PIL's ``GaussianBlur(radius=sigma)``, sigma ~ U(0.1, 2.0), which
has no kernel size; BYOL-style ports fix a 23-px kernel at 224 px (about 10 % of the crop) and
would need a rule for 96- or 16-px crops. A Gaussian is fully represented by +-3 sigma, so we use
the smallest odd kernel that holds +-3 sigma_max (13 px for sigma_max = 2), capped at the largest
odd size that fits in the crop. At 224 and 96 px that is the same blur as PIL's within rounding
(taps beyond 3 sigma weigh < 0.3 %) and cheaper than 23 taps; for tiny crops (Fashion-MNIST
demo) the cap keeps the kernel inside the image. Sigma itself is in output pixels, as in DINO; a
small-image recipe may lower ``blur_sigma``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

SOLARIZE_THRESHOLD = 128  # uint8 semantics (PIL ImageOps.solarize): x >= 128 becomes 255 - x
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights

__all__ = [
    "SOLARIZE_THRESHOLD",
    "ColorJitterFastHue",
    "SeparableGaussianBlur",
    "adjust_hue_uint8",
    "blend",
    "blur",
    "blur_columns",
    "blur_kernel_size",
    "blur_rows",
    "blur_taps",
    "gray",
    "hue_shift",
]


# ---- per image --------------------------------------------------------------------------------


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Odd Gaussian kernel size holding +-3 sigma_max, capped at the largest odd size <= crop_size."""
    wanted = 2 * math.ceil(3.0 * sigma_max) + 1
    fits = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(wanted, fits))


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (same arguments, same sigma sampling) computed as two 1-D passes.

    torchvision convolves with the full k x k kernel; the Gaussian is separable, so a horizontal
    then a vertical pass of k taps, each a sum of shifted slices, gives the same result (to +-1
    grey level from float rounding) about 4x faster at 224 px, and blur is one of the two most
    expensive steps of multi-crop. Reflect padding as torchvision. PIL inputs fall back to the
    parent.
    """

    def transform(self, inpt: object, params: dict[str, object]) -> object:
        if not isinstance(inpt, Tensor):
            return super().transform(inpt, params)
        sigma_x, sigma_y = params["sigma"]  # type: ignore[misc]
        size_x, size_y = self.kernel_size
        pixels = inpt.as_subclass(Tensor)
        is_float = pixels.is_floating_point()
        # Contiguous: views of PIL data are channels-last, and reflect padding of channels-last
        # float tensors takes a slow multi-threaded path (~250x slower at 16 px on 2 threads).
        out = (pixels if is_float else pixels.to(torch.float32)).contiguous()
        # Reflect padding needs a leading batch dim; the passes below work on any leading dims.
        lead = out.shape[:-2]
        out = out.reshape(1, -1, *out.shape[-2:])
        out = F.pad(out, (size_x // 2, size_x // 2, size_y // 2, size_y // 2), mode="reflect")[0]
        out = _blur_pass(out, _gaussian_taps(size_x, sigma_x), dim=-1)
        out = _blur_pass(out, _gaussian_taps(size_y, sigma_y), dim=-2)
        out = out.reshape(*lead, *out.shape[-2:])
        if not is_float:
            out = out.round_().to(pixels.dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class ColorJitterFastHue(v2.ColorJitter):
    """``v2.ColorJitter`` (same arguments, random order and factors) with a faster hue step.

    torchvision shifts hue on tensors by a full RGB -> HSV -> RGB round trip with a gather; hue
    is then about half of all multi-crop time. ``adjust_hue_uint8`` computes the same shift in
    closed form (about 3x faster at 224 px, equal to torchvision's to +-1 grey level). Brightness,
    contrast, saturation and non-uint8 inputs use torchvision's kernels.
    """

    def transform(self, inpt: object, params: dict[str, object]) -> object:
        hue = params["hue_factor"]
        if hue is None or not isinstance(inpt, Tensor) or inpt.dtype != torch.uint8:
            return super().transform(inpt, params)
        output = inpt
        for fn_id in params["fn_idx"]:  # type: ignore[attr-defined]
            if fn_id == 3:
                shifted = adjust_hue_uint8(output.as_subclass(Tensor), float(hue))  # type: ignore[arg-type]
                output = tv_tensors.wrap(shifted, like=output) if isinstance(output, tv_tensors.TVTensor) else shifted
            else:
                output = super().transform(output, {**params, "fn_idx": [fn_id]})
        return output


def adjust_hue_uint8(image: Tensor, hue_factor: float) -> Tensor:
    """Rotate the HSV hue of uint8 RGB ``[..., 3, H, W]`` by ``hue_factor`` turns (-0.5..0.5).

    A hue shift keeps each pixel's max V and min m, so with C = V - m and hue h in [0, 6):
    channel n (R=5, G=3, B=1) = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + h') mod 6, the
    standard closed form of HSV -> RGB. Works on the 0..255 scale directly.
    """
    pixels = image.to(torch.float32)
    red, green, blue = pixels.unbind(-3)
    # Elementwise max/min of the three planes: aminmax over the channel dim was the slowest op here.
    high = torch.maximum(torch.maximum(red, green), blue)
    low = torch.minimum(torch.minimum(red, green), blue)
    chroma = high - low
    inverse = torch.where(chroma > 0, 1.0 / chroma, 0.0)  # grey pixels: hue is irrelevant
    hue = torch.where(
        high == red,
        (green - blue) * inverse,
        torch.where(high == green, (blue - red) * inverse + 2.0, (red - green) * inverse + 4.0),
    )
    hue += 6.0 * hue_factor
    offsets = torch.tensor([5.0, 3.0, 1.0], device=image.device).view(3, 1, 1)
    k = (hue.unsqueeze(-3) + offsets).remainder_(6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (high.unsqueeze(-3) - chroma.unsqueeze(-3) * weight).round_().to(torch.uint8)


def _gaussian_taps(size: int, sigma: float) -> list[float]:
    """Normalised 1-D Gaussian weights at integer offsets -(size//2) .. size//2."""
    half = size // 2
    weights = [math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(-half, half + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def _blur_pass(padded: Tensor, taps: list[float], dim: int) -> Tensor:
    """Valid 1-D correlation along ``dim``: output length = input length - len(taps) + 1."""
    length = padded.shape[dim] - len(taps) + 1
    out = padded.narrow(dim, 0, length) * taps[0]
    for offset, weight in enumerate(taps[1:], start=1):
        out.add_(padded.narrow(dim, offset, length), alpha=weight)
    return out


# ---- batched, per-sample parameters ----------------------------------------------------------


def gray(x: Tensor, truncate: bool = True) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma on the 0..255 scale, truncated (``truncate``) as
    torchvision's uint8 grayscale and its contrast and saturation blends do."""
    r, g, b = x.unbind(1)
    luma = (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)
    return luma.floor_() if truncate else luma


def blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend`` on the 0..255 scale: ``factor * x + (1 - factor) * other``, clamped."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 255.0)


def hue_shift(x: Tensor, turns: Tensor, fast_mod: bool = False) -> Tensor:
    """Rotate the HSV hue of RGB ``[B, 3, H, W]`` (0..255 integers) by per-sample ``turns``, rounded.

    The closed form of the per-image pipeline's ``adjust_hue_uint8`` (a hue shift keeps each
    pixel's max V and min m; channel n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + h') mod 6),
    batched with one factor per sample: within one grey level of torchvision's HSV round trip, and
    several times cheaper than it. ``fast_mod``: ``k - 6 floor(k / 6)`` instead of
    ``torch.remainder`` (equal to float rounding; vectorises when compiled, remainder does not).
    """
    r, g, b = x.unbind(1)
    high = torch.maximum(torch.maximum(r, g), b)
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = high - low
    inverse = 1.0 / chroma.clamp_min(1.0)  # grey pixels (chroma 0): the hue is irrelevant
    h = torch.where(high == r, (g - b) * inverse, torch.where(high == g, (b - r) * inverse + 2.0, (r - g) * inverse + 4.0))
    h = h + 6.0 * turns.view(-1, 1, 1).to(h.dtype)
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = h + offset
        k = k - 6.0 * torch.floor(k / 6.0) if fast_mod else torch.remainder(k, 6.0)
        weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
        channels.append(high - chroma * weight)
    return torch.stack(channels, 1).round()


def blur(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with a per-sample ``sigma`` and an odd ``size``
    (reflect padding): a horizontal then a vertical depthwise convolution, one ``1 x size`` kernel
    per (sample, channel), so every sample keeps its own sigma in one call per pass.

    Eagerly, against ``size`` shifted multiply-adds per pass (:func:`blur_rows` and
    :func:`blur_columns`, which the compiled path uses; ``benchmarks/bench_multicrop.py --ops``):
    the same values to float rounding, 2.6x faster at 224 px on one Zen 1 core, 3x on a Xeon core.
    """
    if size <= 1:
        return x
    b, c, h, w = x.shape
    half = size // 2
    taps = blur_taps(sigma, size, x.dtype).repeat_interleave(c, dim=0)  # [B * C, size]
    padded = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, b * c, h + 2 * half, w + 2 * half)
    rows = F.conv2d(padded, taps.view(b * c, 1, 1, size), groups=b * c)
    return F.conv2d(rows, taps.view(b * c, 1, size, 1), groups=b * c).view(b, c, h, w)


def blur_taps(sigma: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-D Gaussian taps ``[B, size]`` for per-sample ``sigma`` (odd ``size``)."""
    half = size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=dtype)
    taps = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).to(dtype)) ** 2)
    return taps / taps.sum(1, keepdim=True)


def blur_rows(padded: Tensor, taps: Tensor) -> Tensor:
    """The horizontal pass of :func:`blur` as ``size`` shifted multiply-adds, on a reflect-padded
    ``[B, C, H + size - 1, W + size - 1]`` input -> ``[B, C, H + size - 1, W]``."""
    size = taps.shape[1]
    width = padded.shape[3] - size + 1
    t = taps.view(-1, 1, 1, 1, size)
    return sum(t[..., k] * padded[:, :, :, k : k + width] for k in range(size))  # type: ignore[return-value]


def blur_columns(rows: Tensor, taps: Tensor) -> Tensor:
    """The vertical pass of :func:`blur` on :func:`blur_rows`' output -> ``[B, C, H, W]``."""
    size = taps.shape[1]
    height = rows.shape[2] - size + 1
    t = taps.view(-1, 1, 1, 1, size)
    return sum(t[..., k] * rows[:, :, k : k + height, :] for k in range(size))  # type: ignore[return-value]
