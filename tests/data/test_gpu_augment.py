"""The batched, on-device photometric half of multi-crop against torchvision's per-image kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

from xcit_ssl.data.gpu_augment import BatchedPhotometric, augment_views, device_augmentations
from xcit_ssl.data.transforms import MultiCropTransform, adjust_hue_uint8


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth colourful uint8 images [n, 3, size, size] (upsampled noise: edges, flat areas, chroma)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g)
    return (nnf.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 255).round().to(torch.uint8)


def _per_image(img: torch.Tensor, p, i: int, aug: BatchedPhotometric) -> torch.Tensor:
    """DINO's recipe for one image with the per-image pipeline's kernels (torchvision's, and our
    closed-form hue) and the batch's parameters."""
    x = img
    if p.jitter[i]:
        for kind in p.order[i].tolist():
            if kind == 0:
                x = F.adjust_brightness(x, float(p.brightness[i]))
            elif kind == 1:
                x = F.adjust_contrast(x, float(p.contrast[i]))
            elif kind == 2:
                x = F.adjust_saturation(x, float(p.saturation[i]))
            else:  # the per-image pipeline's own hue kernel (ColorJitterFastHue)
                x = adjust_hue_uint8(x, float(p.hue[i]))
    if p.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        s = float(p.sigma[i])
        x = F.gaussian_blur(x, [aug.kernel, aug.kernel], [s, s])
    if p.solarize[i]:
        x = F.solarize(x, 128)
    return x.float()


def test_batched_equals_per_image_with_the_same_parameters() -> None:
    """Within 1 grey level of the per-image pipeline with the same parameters, every step included
    (blends truncate like torchvision's uint8 kernels; hue is the same closed form), 3 seeds."""
    images = _images(64, 32)
    for solarize, blur_prob in ((0.0, 1.0), (1.0, 0.1), (0.5, 0.5)):
        aug = BatchedPhotometric(32, blur_prob, solarize, blur_sigma=(0.1, 2.0), mean=(0, 0, 0), std=(1, 1, 1))
        for seed in range(3):
            params = aug.sample(64, generator=torch.Generator().manual_seed(seed))
            batched = aug.apply(images, params) * 255.0
            for i in range(64):
                diff = (batched[i] - _per_image(images[i], params, i, aug)).abs()
                assert float(diff.max()) <= 1.0 + 1e-4, (seed, i, float(diff.max()))
    # the normalisation is the recipe's
    aug = BatchedPhotometric(32, 0.0, color_jitter_prob=0.0, grayscale_prob=0.0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = aug(images)
    ref = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _stats(views: torch.Tensor) -> dict[str, float]:
    """Per-view statistics on the 0..255 scale: mean, std, chroma, grayscale rate, sharpness."""
    x = views.float()
    chroma = x.amax(1) - x.amin(1)
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs()
    return {
        "mean": float(x.mean()), "std": float(x.std(dim=(1, 2, 3)).mean()), "chroma": float(chroma.mean()),
        "gray_rate": float((chroma.amax(dim=(1, 2)) <= 1).float().mean()), "sharpness": float(lap.mean()),
    }  # fmt: skip


def test_statistics_over_many_draws_match_the_per_image_pipeline() -> None:
    """2,048 draws of each view kind on the same crops, per-image pipeline (torchvision v2, ours) vs
    batched: mean, std, chroma and sharpness within 3 %, grayscale rate within 0.03 (about 3
    standard errors at p = 0.2), solarized views of global view 2 within 0.03."""
    per_image = MultiCropTransform(32, 16, 2, mean=(0, 0, 0), std=(1, 1, 1))
    batched = device_augmentations(MultiCropTransform(32, 16, 2, mean=(0, 0, 0), std=(1, 1, 1), photometric="device"))
    crops = _images(32, 32, seed=3).repeat(64, 1, 1, 1)  # 2,048 draws of 32 crops
    torch.manual_seed(0)
    for kind, compose in ((0, per_image.global_view_1), (1, per_image.global_view_2)):
        photometric = compose.transforms[2:-2]  # after crop + flip, before ToDtype + Normalize
        ref = torch.stack([_apply(photometric, c) for c in crops])
        out = (batched[kind](crops) * 255.0).round().clamp(0, 255)
        a, b = _stats(ref), _stats(out)
        for key in ("mean", "std", "chroma", "sharpness"):
            assert abs(a[key] - b[key]) <= 0.03 * abs(a[key]), (kind, key, a[key], b[key])
        assert abs(a["gray_rate"] - b["gray_rate"]) <= 0.03, (kind, a, b)


def _apply(steps, crop: torch.Tensor) -> torch.Tensor:
    x = crop
    for step in steps:
        x = step(x)
    return x.as_subclass(torch.Tensor).float()


def test_device_photometric_transform_emits_uint8_geometry_and_the_module_finishes_it() -> None:
    from PIL import Image

    t = MultiCropTransform(32, 16, 3, photometric="device")
    views = t(Image.fromarray(_images(1, 40)[0].permute(1, 2, 0).numpy()))
    assert [v.dtype for v in views] == [torch.uint8] * 5 and views[0].shape == (3, 32, 32) and views[2].shape == (3, 16, 16)
    batch = [torch.stack([v] * 4) for v in views]
    out = augment_views(batch, device_augmentations(t))
    assert [o.dtype for o in out] == [torch.float32] * 5 and [o.shape[0] for o in out] == [4] * 5
