"""Data-pipeline throughput of the DINO multi-crop transform, in images/s per CPU core.

One process, one intra-op thread (what each DataLoader worker gets), so the figures are per
core: multiply by the worker count to size a host (a GPU needing N img/s needs N / figure cores).
Rates are images per second of this process's CPU time (time.process_time), so a machine shared
with other jobs still gives per-core figures; wall-clock rates are in the JSON output.

Cases:
  imagenet  ImageNet-sized JPEGs (default 500x375, quality 90, about the ImageNet-1k average),
            written from Fashion-MNIST images upscaled and colourised, DINO's recipe 2x224 + 8x96.
  fmnist    Fashion-MNIST padded to 32 px from memory, demo recipe 2x32 + 4x16.

For each case: decode only, transform only (already decoded), decode + transform (the dataset's
__getitem__), the share of transform time per step type, and the speed-up of our blur and hue
kernels over the stock torchvision v2 steps (same random parameters; measured interleaved, so
machine load affects both sides alike).

    .venv/bin/python benchmarks/bench_data.py [--images 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xcit_ssl.data.datasets import FashionMNIST, ImageFolderDataset  # noqa: E402
from xcit_ssl.data.transforms import ColorJitterFastHue, MultiCropTransform, SeparableGaussianBlur  # noqa: E402


def write_imagenet_like(folder: Path, source: FashionMNIST, n: int, size: tuple[int, int]) -> None:
    """``n`` colour JPEGs of ``size`` (w, h) in ``folder/train/c0``: upscaled, tinted, noisy."""
    rng = np.random.default_rng(0)
    out = folder / "train" / "c0"
    out.mkdir(parents=True)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(n):
        grey = np.asarray(Image.fromarray(source.images[i]).resize(size, Image.BICUBIC), dtype=np.float32) / 255
        tint = rng.uniform(0.3, 1.0, 3)
        background = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(0.2, 0.6)
        rgb = grey[..., None] * tint + (1 - grey[..., None]) * background
        rgb += rng.normal(0, 0.04, rgb.shape)  # texture, so JPEG sizes resemble photos
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(out / f"{i:05d}.JPEG", quality=90)


def throughput(fn: Callable[[int], object], n: int, repeats: int) -> dict[str, list[float]]:
    """Images per CPU second and per wall second of ``fn(i)`` over ``range(n)``, per repeat."""
    for i in range(min(n, 4)):
        fn(i)  # warm-up: allocator, lazy imports
    rates: dict[str, list[float]] = {"cpu": [], "wall": []}
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(n):
            fn(i)
        rates["cpu"].append(n / (time.process_time() - cpu))
        rates["wall"].append(n / (time.perf_counter() - wall))
    return rates


def step_shares(transform: MultiCropTransform, images: Sequence[Image.Image]) -> dict[str, float]:
    """Fraction of transform time spent in each step type (over all views)."""
    spent: dict[str, float] = defaultdict(float)
    views = [(transform.global_view_1, 1), (transform.global_view_2, 1), (transform.local_view, transform.n_local_crops)]
    for image in images:
        start = time.process_time()
        pixels = transform.to_image(image)
        spent["ToImage"] += time.process_time() - start
        for view, count in views:
            for _ in range(count):
                x = pixels
                for step in view.transforms:
                    inner = step.transforms[0] if isinstance(step, v2.RandomApply) else step
                    start = time.process_time()
                    x = step(x)
                    spent[type(inner).__name__] += time.process_time() - start
    total = sum(spent.values())
    return {name: t / total for name, t in sorted(spent.items(), key=lambda kv: -kv[1])}


def stock_variant(transform: MultiCropTransform) -> MultiCropTransform:
    """A copy using torchvision's own GaussianBlur and ColorJitter (the A/B reference)."""
    stock = copy.deepcopy(transform)
    for view in (stock.global_view_1, stock.global_view_2, stock.local_view):
        for step in view.transforms:
            if not isinstance(step, v2.RandomApply):
                continue
            inner = step.transforms[0]
            if isinstance(inner, SeparableGaussianBlur):
                step.transforms[0] = v2.GaussianBlur(inner.kernel_size, sigma=inner.sigma)
            elif isinstance(inner, ColorJitterFastHue):
                step.transforms[0] = v2.ColorJitter(inner.brightness, inner.contrast, inner.saturation, inner.hue)
    return stock


def speedup_over_stock(transform: MultiCropTransform, images: Sequence[Image.Image], rounds: int) -> float:
    """Median time of the stock-v2 variant / ours, alternating image by image."""
    stock = stock_variant(transform)
    ours_t, stock_t = [], []
    for _ in range(rounds):
        for image in images:
            for fn, acc in ((transform, ours_t), (stock, stock_t)):
                start = time.process_time()
                fn(image)
                acc.append(time.process_time() - start)
    return statistics.median(stock_t) / statistics.median(ours_t)


def run_case(name: str, dataset: torch.utils.data.Dataset, transform: MultiCropTransform, repeats: int) -> dict:
    n = len(dataset)  # type: ignore[arg-type]
    decoded = [dataset[i][0] for i in range(n)]
    with_transform = dataset.with_transform(transform)  # type: ignore[attr-defined]
    result = {
        "case": name,
        "recipe": f"2x{transform.global_crop_size} + {transform.n_local_crops}x{transform.local_crop_size}",
        "images": n,
        "decode": throughput(lambda i: dataset[i], n, repeats),
        "transform": throughput(lambda i: transform(decoded[i]), n, repeats),
        "decode+transform": throughput(lambda i: with_transform[i], n, repeats),
        "shares": step_shares(transform, decoded[: min(n, 16)]),
        "speedup_vs_stock_v2": speedup_over_stock(transform, decoded[: min(n, 32)], repeats),
    }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per case (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measure (default 3)")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--fmnist-local", type=int, default=4, help="local crops of the fmnist case (default 4)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # per-core figures, as in a DataLoader worker
    fmnist = FashionMNIST(train=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_imagenet_like(Path(tmp), fmnist, args.images, tuple(args.jpeg_size))
        jpegs = ImageFolderDataset(tmp, "train")
        mean_kb = np.mean([os.path.getsize(jpegs.path(i)) for i in range(len(jpegs))]) / 1024
        results.append(run_case(f"imagenet ({args.jpeg_size[0]}x{args.jpeg_size[1]} JPEG, {mean_kb:.0f} KB)",
                                jpegs, MultiCropTransform(), args.repeats))  # fmt: skip
    fmnist32 = torch.utils.data.Subset(FashionMNIST(train=True, pad_to=32), range(args.images * 4))
    fmnist32.with_transform = lambda t: FashionMNIST(train=True, pad_to=32, transform=t)  # type: ignore[attr-defined]
    demo = MultiCropTransform(32, 16, n_local_crops=args.fmnist_local, global_crop_scale=(0.4, 1.0))
    results.append(run_case("fmnist (28 px padded to 32, in memory)", fmnist32, demo, args.repeats))

    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, 1 process; "
          "images per CPU-second")
    print("| case | views | decode img/s | transform img/s | decode+transform img/s (median, best) "
          "| x stock v2 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        med = {k: statistics.median(r[k]["cpu"]) for k in ("decode", "transform", "decode+transform")}
        print(f"| {r['case']} | {r['recipe']} | {med['decode']:.0f} | {med['transform']:.1f} | "
              f"{med['decode+transform']:.1f}, {max(r['decode+transform']['cpu']):.1f} | "
              f"{r['speedup_vs_stock_v2']:.2f} |")  # fmt: skip
    for r in results:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in r["shares"].items() if v >= 0.01)
        print(f"\n{r['case']}: transform time by step: {shares}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
