"""Multi-crop views (shapes, DINO's per-view recipe, solarize/blur behaviour) and the eval transform."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import tv_tensors
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2

from xcit_ssl.data.photometric_kernels import (
    ColorJitterFastHue,
    SeparableGaussianBlur,
    adjust_hue_uint8,
    blur_kernel_size,
)
from xcit_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform, build_eval_transform
from xcit_ssl.errors import UserError

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Per-image transforms run in DataLoader workers, which use one intra-op thread; on a busy
    # 2-core machine, two threads make these tiny ops tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _natural_image(width: int = 300, height: int = 200) -> Image.Image:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 9.0)], -1) * 200 + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _uint8(view: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalisation: [3, H, W] float -> grey levels 0..255 (float)."""
    return (view * STD + MEAN) * 255


def _plain(**overrides: object) -> MultiCropTransform:
    """Multi-crop with every random photometric step off unless overridden."""
    args: dict[str, object] = dict(
        global_crop_size=16,
        local_crop_size=8,
        n_local_crops=2,
        global_crop_scale=(1.0, 1.0),
        local_crop_scale=(1.0, 1.0),
        blur_probs=(0.0, 0.0, 0.0),
        solarize_prob=0.0,
        color_jitter_prob=0.0,
        grayscale_prob=0.0,
    )
    args.update(overrides)
    return MultiCropTransform(**args)  # type: ignore[arg-type]


def _steps(view: v2.Compose, kind: type) -> list:
    found = []
    for step in view.transforms:
        inner = step.transforms if isinstance(step, v2.RandomApply) else [step]
        found += [(step, t) for t in inner if isinstance(t, kind)]
    return found


def test_multicrop_shapes_and_count() -> None:
    views = MultiCropTransform()(_natural_image())
    assert len(views) == 10
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in views)
    small = MultiCropTransform(32, 16, n_local_crops=0)(Image.new("L", (28, 28), 90))  # grayscale in
    assert [tuple(v.shape) for v in small] == [(3, 32, 32)] * 2


def test_multicrop_per_view_recipe_is_dinos() -> None:
    t = MultiCropTransform()
    views = {"global_1": t.global_view_1, "global_2": t.global_view_2, "local": t.local_view}
    blur_p = {"global_1": 1.0, "global_2": 0.1, "local": 0.5}
    for name, view in views.items():
        ((_, crop),) = _steps(view, v2.RandomResizedCrop)
        size, scale = ((224, 224), (0.4, 1.0)) if name != "local" else ((96, 96), (0.05, 0.4))
        assert crop.size == size and tuple(crop.scale) == scale
        assert crop.interpolation == InterpolationMode.BICUBIC
        ((_, flip),) = _steps(view, v2.RandomHorizontalFlip)
        assert flip.p == 0.5
        ((wrap, jitter),) = _steps(view, v2.ColorJitter)
        assert wrap.p == 0.8
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
            (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1),
        )  # fmt: skip
        ((_, gray),) = _steps(view, v2.RandomGrayscale)
        assert gray.p == 0.2
        ((wrap, blur),) = _steps(view, v2.GaussianBlur)
        assert wrap.p == blur_p[name] and tuple(blur.sigma) == (0.1, 2.0)
        solarize = _steps(view, v2.RandomSolarize)
        if name == "global_2":
            assert [(s.p, s.threshold) for _, s in solarize] == [(0.2, 128)]
        else:
            assert solarize == []
        # Order: geometry, colour, blur, solarize, then normalisation last.
        kinds = [type(s) for s in view.transforms]
        assert kinds[0] is v2.RandomResizedCrop and kinds[-2:] == [v2.ToDtype, v2.Normalize]


@pytest.mark.parametrize(("grey", "expected"), [(0, 0), (127, 127), (128, 127), (200, 55), (255, 0)])
def test_solarize_uses_uint8_threshold_128(grey: int, expected: int) -> None:
    views = _plain(solarize_prob=1.0)(Image.new("RGB", (20, 20), (grey, grey, grey)))
    assert torch.allclose(_uint8(views[0]), torch.full((3, 16, 16), float(grey)), atol=1e-3)  # global 1: never
    assert torch.allclose(_uint8(views[1]), torch.full((3, 16, 16), float(expected)), atol=1e-3)
    assert torch.allclose(_uint8(views[2]), torch.full((3, 8, 8), float(grey)), atol=1e-3)  # locals: never


def test_solarize_and_blur_frequencies_per_view() -> None:
    # A 16-px checkerboard of grey levels 0/100 cropped whole (scale (1, 1) only accepts the full
    # square) and resized 16 -> 16 (identity): a sigma-2 blur flattens it to grey, nothing else
    # here does. Its top-left pixel is white (255) with or without the horizontal flip; solarize
    # (x >= 128 -> 255 - x) turns only that pixel black.
    board = (np.indices((16, 16)).sum(0) % 2 * 100).astype(np.uint8)
    board[0, 0] = board[0, 15] = 255
    image = Image.fromarray(board).convert("RGB")
    t = _plain(local_crop_size=16, n_local_crops=6, blur_sigma=(2.0, 2.0), blur_probs=(1.0, 0.1, 0.5), solarize_prob=0.2)
    trials = 300
    blurred: list[list[bool]] = [[], [], []]
    solarized: list[list[bool]] = [[], [], []]
    for _ in range(trials):
        views = [_uint8(v)[0] for v in t(image)]
        for group, members in enumerate((views[:1], views[1:2], views[2:])):
            for view in members:
                is_blurred = float(view.std()) < 10
                blurred[group].append(is_blurred)
                if not is_blurred:
                    solarized[group].append(float(view[0, 0]) < 128)
    freq_blur = [float(np.mean(b)) for b in blurred]
    assert freq_blur[0] == 1.0
    assert abs(freq_blur[1] - 0.1) < 5 * math.sqrt(0.1 * 0.9 / trials)
    assert abs(freq_blur[2] - 0.5) < 5 * math.sqrt(0.5 * 0.5 / (6 * trials))
    assert abs(np.mean(solarized[1]) - 0.2) < 5 * math.sqrt(0.2 * 0.8 / len(solarized[1]))
    assert not any(solarized[2]) and len(solarized[2]) > 100


def test_blur_kernel_size_rule() -> None:
    # +-3 sigma_max (13 taps for DINO's sigma <= 2), capped to an odd size inside the crop.
    assert blur_kernel_size(224, 2.0) == blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(16, 2.0) == 13 and blur_kernel_size(8, 2.0) == 7 and blur_kernel_size(12, 2.0) == 11
    assert blur_kernel_size(224, 0.5) == 5
    t = MultiCropTransform(32, 8, n_local_crops=1)
    ((_, blur),) = _steps(t.local_view, v2.GaussianBlur)
    assert tuple(blur.kernel_size) == (7, 7)


@pytest.mark.parametrize(("kernel", "sigma", "shape"), [((13, 13), 2.0, (3, 40, 30)), ((7, 5), 0.7, (2, 3, 9, 11))])
def test_separable_blur_matches_torchvision(kernel: tuple[int, int], sigma: float, shape: tuple[int, ...]) -> None:
    # Reference: torchvision's full 2-D Gaussian convolution, same kernel sizes and sigma.
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    ours = SeparableGaussianBlur(kernel, sigma=(sigma, sigma))(pixels)
    reference = TF.gaussian_blur(pixels, list(kernel), [sigma, sigma])
    assert ours.dtype == torch.uint8 and ours.shape == reference.shape
    diff = (ours.int() - reference.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # float rounding at .5 only
    floats = pixels.float() / 255
    torch.testing.assert_close(
        SeparableGaussianBlur(kernel, sigma=(sigma, sigma))(floats), TF.gaussian_blur(floats, list(kernel), [sigma, sigma])
    )


def test_plain_views_are_normalised_pixels() -> None:
    image = _natural_image(16, 16)
    views = _plain(local_crop_size=16)(image)
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - MEAN) / STD
    for view in views:
        # Only the flip remains random.
        assert torch.allclose(view, expected, atol=1e-5) or torch.allclose(view, expected.flip(-1), atol=1e-5)


def test_multicrop_reproducible_under_seed() -> None:
    t = MultiCropTransform(32, 16, n_local_crops=2)
    image = _natural_image(64, 48)
    torch.manual_seed(3)
    first = t(image)
    torch.manual_seed(3)
    second = t(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_multicrop_rejects_bad_arguments() -> None:
    with pytest.raises(UserError, match="global_crop_scale"):
        MultiCropTransform(global_crop_scale=(0.5, 0.2))
    with pytest.raises(UserError, match="solarize_prob"):
        MultiCropTransform(solarize_prob=1.5)
    with pytest.raises(UserError, match="n_local_crops"):
        MultiCropTransform(n_local_crops=-1)


def test_eval_transform_resizes_shorter_side_then_center_crops() -> None:
    image = _natural_image(300, 200)
    out = build_eval_transform()(image)
    assert type(out) is torch.Tensor and out.shape == (3, 224, 224) and out.dtype == torch.float32
    # Reference written from the definition: shorter side 200 -> 256 (so 300 -> 384), bicubic,
    # then the central 224 x 224.
    pixels = TF.pil_to_tensor(image)
    resized = TF.resize(pixels, [256, 384], interpolation=InterpolationMode.BICUBIC, antialias=True)
    top, left = (256 - 224) // 2, (384 - 224) // 2
    crop = resized[:, top : top + 224, left : left + 224].float() / 255
    torch.testing.assert_close(out, (crop - MEAN) / STD)
    grey = build_eval_transform(32, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(Image.new("L", (32, 32), 255))
    assert grey.shape == (3, 32, 32) and torch.allclose(grey, torch.ones_like(grey))
    with pytest.raises(UserError, match="resize_size"):
        build_eval_transform(200, 224)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_eval_transform_fast_path_equals_the_torchvision_pipeline(mode: str) -> None:
    """PIL images skip v2.Compose; the result must be the pipeline's, bit for bit (sizes that
    resize up, down, not at all, and odd center-crop offsets)."""
    ref = v2.Compose([v2.RGB(), v2.ToImage(), v2.Resize(64, interpolation=InterpolationMode.BICUBIC, antialias=True),
                      v2.CenterCrop(48), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
                      v2.ToPureTensor()])  # fmt: skip
    fast = build_eval_transform(64, 48)
    for width, height in ((300, 200), (57, 91), (64, 64), (64, 80)):
        image = _natural_image(width, height).convert(mode)
        out = fast(image)
        assert type(out) is torch.Tensor and out.shape == (3, 48, 48)
        assert torch.equal(out, ref(image)), (mode, width, height)
    tensor = TF.pil_to_tensor(_natural_image(57, 91))  # a uint8 tensor goes through the pipeline itself
    assert torch.equal(fast(tensor), ref(tensor))


@pytest.mark.parametrize("factor", [-0.5, -0.1, 0.03, 0.1, 0.5])
def test_fast_hue_matches_torchvision(factor: float) -> None:
    pixels = torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8)
    pixels[0, :, :4] = 90  # grey pixels: no hue to rotate
    pixels[1, 0, :4] = pixels[1, 1, :4]  # ties between the max channels
    ours = adjust_hue_uint8(pixels, factor)
    reference = TF.adjust_hue(pixels, factor)  # RGB -> HSV -> RGB round trip
    diff = (ours.int() - reference.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.15
    assert torch.equal(ours[0, :, :4], pixels[0, :, :4])


def test_fast_hue_jitter_applies_torchvision_steps_in_the_same_order() -> None:
    pixels = tv_tensors.Image(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    ours = ColorJitterFastHue(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    reference = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    for trial in range(12):
        params = ours.make_params([pixels])
        if trial == 0:
            params["fn_idx"] = torch.tensor([0, 1, 2, 3])  # hue last: only its own rounding
        out, expected = ours.transform(pixels, params), reference.transform(pixels, params)
        assert isinstance(out, tv_tensors.Image)
        diff = (out.int() - expected.int()).abs()
        # A +-1 hue rounding difference is scaled by later brightness/contrast/saturation steps
        # (each factor <= 1.4) and re-rounded; it stays rare.
        assert diff.max() <= (1 if trial == 0 else 4) and (diff > 0).float().mean() < 0.15


@pytest.mark.parametrize(("height", "width", "scale"), [(40, 40, (0.3, 1.0)), (375, 500, (0.05, 0.4)), (24, 96, (0.9, 1.0))])
def test_device_path_geometry_is_the_v2_crop_and_flip_for_the_same_seed(height, width, scale) -> None:
    """``photometric='device'`` crops with its own lean code (no v2 dispatch); for one RNG state it
    gives exactly the pixels of the v2 ``RandomResizedCrop`` + ``RandomHorizontalFlip`` views, so the
    split path draws the crops the per-image pipeline draws. The 24 x 96 image with scale (0.9, 1)
    cannot fit a 3/4..4/3 box in 10 tries: the centred fallback crop is covered too."""
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    t = MultiCropTransform(32, 16, 3, global_crop_scale=scale, local_crop_scale=scale, photometric="device")
    flips = 0
    for seed in range(60):
        torch.manual_seed(seed)
        ours = t(image)
        torch.manual_seed(seed)
        ref = [t.global_view_1(image), t.global_view_2(image)] + [t.local_view(image) for _ in range(3)]
        assert [v.dtype for v in ours] == [torch.uint8] * 5
        for a, b in zip(ours, ref):
            assert torch.equal(a, b.as_subclass(torch.Tensor)), seed
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        assert 0 <= top <= height - h and 0 <= left <= width - w
        flips += int(torch.rand(1) < 0.5)
    assert 10 < flips < 50  # both branches of the flip were exercised
    if width / height > 4 / 3 and scale[0] > 0.8:  # only the fallback fits: the largest centred 4/3 box
        torch.manual_seed(0)
        assert tuple(T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])) == (0, (width - 32) // 2, 24, 32)
