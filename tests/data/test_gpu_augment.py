"""The batched, on-device photometric half of multi-crop against torchvision's per-image kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

from xcit_ssl.data.gpu_augment import BatchedPhotometric, augment_views, device_augmentations
from xcit_ssl.data.photometric_kernels import adjust_hue_uint8
from xcit_ssl.data.transforms import MultiCropTransform


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


def _fused_vs_per_image(aug: BatchedPhotometric, images: torch.Tensor, params, out: torch.Tensor) -> None:
    for i in range(images.shape[0]):
        diff = (out[i] * 255.0 - _per_image(images[i], params, i, aug)).abs()
        assert float(diff.max()) <= 1.0 + 1e-3, (i, float(diff.max()))


def test_fused_graph_equals_the_per_image_pipeline_eagerly() -> None:
    """``fused_apply`` (static shapes, every jitter position computed for the whole batch and
    selected per sample) gives what the per-image kernels give with the same parameters, within
    one grey level, for every order of the four jitter operations and with blur/solarize on."""
    from xcit_ssl.data.gpu_augment import fused_apply

    images = _images(48, 24, seed=5)
    aug = BatchedPhotometric(24, 0.5, 0.5, mean=(0, 0, 0), std=(1, 1, 1))
    params = aug.sample(48, generator=torch.Generator().manual_seed(7))
    assert len({tuple(o) for o in params.order[params.jitter].tolist()}) > 10  # many orders covered
    _fused_vs_per_image(aug, images, params, fused_apply(*aug.fused_args(images, params)))


def test_compiled_photometric_equals_eager_and_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    """``compile=True`` runs the fused graphs through torch.compile (on this CPU: Inductor's C++
    backend) with the same per-sample parameters: within one grey level of the per-image
    pipeline. Where compilation fails the module warns once and gives the eager result."""
    import logging

    from xcit_ssl.data import gpu_augment

    images = _images(16, 16, seed=2)
    aug = BatchedPhotometric(16, 1.0, 0.5, mean=(0, 0, 0), std=(1, 1, 1), compile=True)
    monkeypatch.setattr(gpu_augment, "_COMPILED", {})
    torch.manual_seed(3)
    params = aug.sample(16)
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="xcit_ssl.data.gpu_augment"):
        out = aug(images)
    if "failed" not in gpu_augment._COMPILED:  # a machine without a C++ compiler takes the fallback below
        assert any("compiled the batched photometric" in r.getMessage() for r in caplog.records)
    _fused_vs_per_image(aug, images, params, out)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(gpu_augment, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.data.gpu_augment"):
        torch.manual_seed(3)
        first = aug(images)
        torch.manual_seed(3)
        second = aug(images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "eagerly" in warnings[0]
    torch.testing.assert_close(first, aug.apply(images, params))
    torch.testing.assert_close(second, first)


def test_photometric_compile_without_the_device_path_is_refused() -> None:
    import pytest

    from xcit_ssl.errors import UserError

    with pytest.raises(UserError, match="photometric device"):
        MultiCropTransform(32, 16, 2, photometric="per_image", photometric_compile=True)
    assert MultiCropTransform(32, 16, 2, photometric="device", photometric_compile=True).photometric_compile


def test_a_jitter_strength_of_zero_leaves_its_operation_out_on_both_paths() -> None:
    """The grayscale demo's jitter (brightness 0.4, contrast 0.4, saturation 0, hue 0): the eager
    and the fused batched paths equal the per-image kernels with saturation and hue skipped (the
    drawn factors are then identities, so skipping changes nothing but the time), and the
    per-image pipeline of MultiCropTransform builds its ColorJitter with the same strengths."""
    from xcit_ssl.data.gpu_augment import fused_apply

    images = _images(48, 24, seed=11)
    aug = BatchedPhotometric(24, 0.5, 0.5, mean=(0, 0, 0), std=(1, 1, 1), jitter=(0.4, 0.4, 0.0, 0.0))
    params = aug.sample(48, generator=torch.Generator().manual_seed(3))
    assert torch.all(params.saturation[params.jitter] == 1) and torch.all(params.hue[params.jitter] == 0)
    assert aug._active_ops == (0, 1)
    eager = aug.apply(images, params)
    _fused_vs_per_image(aug, images, params, eager)
    _fused_vs_per_image(aug, images, params, fused_apply(*aug.fused_args(images, params)))
    order = aug.fused_args(images, params)[3]
    assert set(order.flatten().tolist()) == {-1, 0, 1}  # saturation and hue take their turn as no-ops
    # brightness and contrast still act: the views are not the untouched crops
    assert float((eager * 255 - images.float()).abs()[params.jitter].max()) > 5

    t = MultiCropTransform(32, 16, 2, color_jitter=(0.4, 0.4, 0.0, 0.0), grayscale_prob=0.0, photometric="device")
    assert device_augmentations(t)[0].jitter_strength == (0.4, 0.4, 0.0, 0.0)
    jitter = MultiCropTransform(32, 16, 2, color_jitter=(0.4, 0.4, 0.0, 0.0)).global_view_1.transforms[2].transforms[0]
    assert (jitter.saturation, jitter.hue) == (None, None) and jitter.brightness == (0.6, 1.4)


def test_bad_colour_jitter_strengths_are_refused_naming_dino_values() -> None:
    import pytest

    from xcit_ssl.errors import UserError

    for bad in ((0.4, 0.4, 0.2), (0.4, -0.1, 0.2, 0.1), (0.4, 0.4, 0.2, 0.6)):
        with pytest.raises(UserError, match=r"color_jitter=.*DINO: \[0.4, 0.4, 0.2, 0.1\]"):
            MultiCropTransform(32, 16, 2, color_jitter=bad)
