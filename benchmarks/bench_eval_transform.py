"""The evaluation transform on Fashion-MNIST: torchvision's v2 pipeline vs ``EvalTransform``'s PIL path.

Every k-NN / linear-probe row decodes and transforms all 70,000 images once (feature extraction,
then the cache). ``build_eval_transform`` returns :class:`xcit_ssl.data.transforms.EvalTransform`,
which calls the pipeline's own kernels (RGB, pil_to_tensor, resize, center crop, to float,
normalise) directly on plain tensors; the baseline is the ``v2.Compose`` of the same transforms
(``EvalTransform.compose``, what it returned before). Both run on the same images in this process,
interleaved per repeat, and must agree bit for bit. The images are the installed Fashion-MNIST test
split at the demo's size (padded to 32 px); with ``--extract`` the whole feature extraction of the
test split through the demo's 3-block network (``extract_features``, DataLoader workers included)
is timed with each transform as well.

    .venv/bin/python benchmarks/bench_eval_transform.py [--n 5000] [--repeats 3] [--extract] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xcit_ssl.data.datasets import open_dataset  # noqa: E402
from xcit_ssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="test images per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extract", action="store_true", help="also time extract_features on the 10k test split")
    ap.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    data = open_dataset("fashion_mnist", None, "test", pad_to=32)
    images = [data[i][0] for i in range(min(args.n, len(data)))]
    fast = build_eval_transform(32, 32, IMAGENET_MEAN, IMAGENET_STD)
    paths = {"v2.Compose (before)": fast.compose, "EvalTransform": fast}
    assert all(torch.equal(fast(im), fast.compose(im)) for im in images[:500]), "the two paths differ"
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            for im in images:
                fn(im)
            rates[name].append(len(images) / (time.perf_counter() - start))
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "images": len(images),
              "transform_img_per_s": {k: statistics.median(v) for k, v in rates.items()}}  # fmt: skip
    for name, rate in result["transform_img_per_s"].items():
        print(f"transform {name:22s} {rate:8.0f} img/s (median of {args.repeats})")
    ratio = result["transform_img_per_s"]["EvalTransform"] / result["transform_img_per_s"]["v2.Compose (before)"]
    print(f"EvalTransform / v2.Compose: {ratio:.2f}x")
    result["transform_ratio"] = ratio

    if args.extract:
        from xcit_ssl.evaluation.features import CLSFeatures, extract_features
        from xcit_ssl.models import build_backbone

        model = CLSFeatures(build_backbone("xcit_nano_12_p8_224", depth=3, img_size=32), "cls+pyramid")
        ext: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(max(1, args.repeats - 1)):
            for name, fn in paths.items():
                start = time.perf_counter()
                extract_features(model, data, fn, 256, args.num_workers, accelerator="cpu", progress=False)
                ext[name].append(len(data) / (time.perf_counter() - start))
        result["extract_img_per_s"] = {k: statistics.median(v) for k, v in ext.items()}
        for name, rate in result["extract_img_per_s"].items():
            print(f"extract_features with {name:22s} {rate:8.0f} img/s ({args.num_workers} workers)")
        e = result["extract_img_per_s"]
        result["extract_ratio"] = e["EvalTransform"] / e["v2.Compose (before)"]
        print(f"extraction, EvalTransform / v2.Compose: {result['extract_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
