"""Weighted k-NN: time and peak memory of faiss vs the torch fallback vs scikit-learn, and
feature-extraction throughput.

Each k-NN method runs in its own process on the same synthetic, clustered, L2-normalised features
(seeded), so its peak RSS is its own; "extra peak" is peak RSS minus the RSS with the features
loaded. Accuracies are printed too: all methods must agree.

    .venv/bin/python benchmarks/bench_knn.py                      # 100k x 10k, d=384 (default)
    .venv/bin/python benchmarks/bench_knn.py --n_train 20000 --n_test 2000 --skip_extraction
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

KS = (10, 20, 100, 200)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_features(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Clustered features (ImageNet-like: many classes, overlapping clusters), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    # noise 3.0: k=20 top-1 is about 60-80 %, neither trivial nor random
    x_train = F.normalize(centers[y_train] + 3.0 * torch.randn(n_train, dim, generator=g), dim=1)
    x_test = F.normalize(centers[y_test] + 3.0 * torch.randn(n_test, dim, generator=g), dim=1)
    return x_train, y_train, x_test, y_test


def worker(method: str, n_train: int, n_test: int, dim: int, classes: int) -> dict:
    x_train, y_train, x_test, y_test = make_features(n_train, n_test, dim, classes)
    base = rss_mib()
    start = time.perf_counter()
    if method in ("faiss", "torch"):
        from xcit_ssl.evaluation.knn import knn_evaluate

        result = knn_evaluate(x_train, y_train, x_test, y_test, ks=KS, backend=method)
        top1 = {k: round(v, 3) for k, v in result.top1.items()}
        what = f"xcit_ssl knn_evaluate, backend={result.backend}, k in {list(KS)} from one search"
    else:
        from sklearn.neighbors import KNeighborsClassifier

        # same rule: cosine distance d = 1 - sim, weight exp(sim / T) = exp((1 - d) / T)
        clf = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine",
                                   weights=lambda d: np.exp((1.0 - d) / 0.07))  # fmt: skip
        clf.fit(x_train.numpy(), y_train.numpy())
        pred = clf.predict(x_test.numpy())
        top1 = {20: round(100.0 * float((pred == y_test.numpy()).mean()), 3)}
        what = "sklearn KNeighborsClassifier(brute, cosine, weights=exp(sim/T)), k=20 only"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "sklearn":  # agreement check on the same queries (after the measurement)
        from xcit_ssl.evaluation.knn import knn_evaluate

        ours = knn_evaluate(x_train, y_train, x_test, y_test, ks=(20,), backend="faiss")
        top1["20_ours_same_queries"] = round(ours.top1[20], 3)
    return {"method": method, "what": what, "n_train": n_train, "n_test": n_test, "seconds": round(seconds, 2),
            "us_per_query": round(1e6 * seconds / n_test, 1), "rss_with_features_mib": round(base),
            "peak_rss_mib": round(peak), "extra_peak_mib": round(peak - base), "top1": top1}  # fmt: skip


def bench_extraction(n_images: int, n_fmnist: int) -> list[dict]:
    """images/s of extract_features (transform + forward, CPU) for a few backbones and sizes."""
    from PIL import Image

    from xcit_ssl.data.datasets import FashionMNIST
    from xcit_ssl.evaluation.features import CLSFeatures, extract_features
    from xcit_ssl.evaluation.protocol import build_feature_transform
    from xcit_ssl.models.registry import create_backbone

    rng = np.random.default_rng(0)
    photos = [(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), 0) for _ in range(n_images)]
    fm = FashionMNIST(train=False, pad_to=32)
    fm_items = [fm[i] for i in range(n_fmnist)]
    rows = []
    for name, data, resize, crop, n in (
        ("xcit_nano_12_p16_224", fm_items, 32, 32, n_fmnist),
        ("xcit_nano_12_p8_224", fm_items, 32, 32, n_fmnist),
        ("xcit_nano_12_p16_224", photos, 256, 224, n_images),
        ("xcit_small_12_p16_224", photos, 256, 224, n_images),
    ):
        model = CLSFeatures(create_backbone(name, num_classes=0))
        tf = build_feature_transform(resize, crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        start = time.perf_counter()
        extract_features(model, data[:n], tf, batch_size=64, num_workers=0, accelerator="cpu", progress=False)
        seconds = time.perf_counter() - start
        rows.append({"backbone": name, "input": f"{resize}->{crop}", "images": n,
                     "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_train", type=int, default=100_000)
    parser.add_argument("--n_test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--methods", default="faiss,torch,sklearn")
    parser.add_argument("--sklearn_n_test", type=int, default=2000,
                        help="queries for scikit-learn (slow on a small CPU; its time is extrapolated)")
    parser.add_argument("--extraction_images", type=int, default=16)
    parser.add_argument("--extraction_fmnist", type=int, default=1000)
    parser.add_argument("--skip_extraction", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 avoids OpenMP stalls on a busy host")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.n_train, args.n_test, args.dim, args.classes)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, *sizes)))
        return
    print(f"# k-NN {args.n_train} train x {args.n_test} test, d={args.dim}, {args.classes} classes, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average {os.getloadavg()}",
          flush=True)  # fmt: skip
    results = []
    for method in filter(None, args.methods.split(",")):
        n_test = args.sklearn_n_test if method == "sklearn" else args.n_test
        cmd = [sys.executable, __file__, "--worker", method, "--n_train", str(args.n_train), "--n_test",
               str(n_test), "--dim", str(args.dim), "--classes", str(args.classes), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    # time is linear in n_train * n_test (inner products dominate); ImageNet-1k: 1.28M x 50k
    for r in results:
        at_size = r["seconds"] * args.n_test / r["n_test"]
        imagenet = r["seconds"] * 1_281_167 * 50_000 / (r["n_train"] * r["n_test"])
        print(f"{r['method']}: {at_size:.1f} s at {args.n_train} x {args.n_test}; "
              f"extrapolated to ImageNet 1.28M x 50k: {imagenet / 60:.0f} min", flush=True)  # fmt: skip
    if not args.skip_extraction:
        bench_extraction(args.extraction_images, args.extraction_fmnist)


if __name__ == "__main__":
    main()
