"""The fast linear probe's learning-rate sweep: candidates one after another vs side by side.

``sweep_linear_on_features`` trains one probe per base lr on the held-out split of the training
features, then the chosen one on all of them. The sequential baseline here is what it did before:
one ``train_linear_on_features`` run per candidate. The joint path trains them in one pass
(``_train_linears_jointly``: one SGD parameter group each, one gather and one logits product for
all). Both run on the same seeded features in this process, interleaved per repeat, and must give
the same probes (the largest weight difference is printed).

Sizes default to the demo's raw-pixel probe, the widest of its table: 54,000 training / 6,000
held-out features of 3,072 dims (3 x 32 x 32 pixels), 10 classes, the five base lrs of
``eval/linear_fmnist.yaml``, batch 256.

    .venv/bin/python benchmarks/bench_linear_sweep.py [--epochs 5] [--dim 3072] [--repeats 2] [--json out.json]
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

from xcit_ssl.evaluation.linear import _train_linears_jointly, train_linear_on_features  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_train", type=int, default=54000)
    ap.add_argument("--n_val", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--epochs", type=int, default=5, help="per candidate (the protocol: 20; time is linear in it)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, args.dim, generator=g)
    y = torch.randint(0, 10, (args.n_train + args.n_val,), generator=g)
    x = centers[y] + 4.0 * torch.randn(len(y), args.dim, generator=g)
    xt, yt, xv, yv = x[: args.n_train], y[: args.n_train], x[args.n_train :], y[args.n_train :]
    kw = {"epochs": args.epochs, "batch_size": args.batch, "momentum": 0.9, "weight_decay": 0.0, "device": "cpu", "seed": 0}

    times: dict[str, list[float]] = {"sequential": [], "joint": []}
    max_diff = 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        seq = [train_linear_on_features(xt, yt, xv, yv, base_lr=lr, **kw) for lr in args.lrs]
        times["sequential"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        joint = _train_linears_jointly(xt, yt, xv, yv, args.lrs, **kw)
        times["joint"].append(time.perf_counter() - t0)
        for (a, _), (b, _) in zip(seq, joint):
            max_diff = max(max_diff, float((a.weight - b.weight).detach().abs().max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "sizes": {"n_train": args.n_train, "n_val": args.n_val, "dim": args.dim, "epochs": args.epochs,
                  "batch": args.batch, "lrs": args.lrs},
        "seconds_median": med, "speedup": med["sequential"] / med["joint"], "max_weight_diff": max_diff,
    }  # fmt: skip
    print(f"{len(args.lrs)} candidates x {args.epochs} epochs on {args.n_train} x {args.dim} features "
          f"({result['machine']}):")  # fmt: skip
    print(f"  sequential {med['sequential']:.1f} s, joint {med['joint']:.1f} s: {result['speedup']:.2f}x; "
          f"largest weight difference {max_diff:.2e}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
