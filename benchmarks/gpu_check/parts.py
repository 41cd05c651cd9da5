"""The parts of ``benchmarks/gpu_check.sh`` that are more than one command, one subcommand each.

Each writes one JSON file (``--json``); ``gpu_check.sh`` runs each under ``timeout`` in its
``part`` function and merges them (``merge``) into ``$OUT/results.json``. The CLI parts start the
real command (``python -m xcit_ssl.cli fit|knn``, with this interpreter) and record its command line.

    python benchmarks/gpu_check/parts.py env --site /tmp/site --wheels .whl --json env.json
    python benchmarks/gpu_check/parts.py write-data --root /tmp/data --train 1600 --val 320 --classes 16
    python benchmarks/gpu_check/parts.py data-pipeline --root /tmp/data --workers 14 --json data.json
    python benchmarks/gpu_check/parts.py photometric --device cuda --json photometric.json
    python benchmarks/gpu_check/parts.py fit --root /tmp/data --work /tmp/w --json fit.json -- FIT FLAGS
    python benchmarks/gpu_check/parts.py kill-resume --strategy fsdp --work /tmp/w --json kr.json -- FIT FLAGS
    python benchmarks/gpu_check/parts.py knn --root /tmp/data --json knn.json -- KNN FLAGS
    python benchmarks/gpu_check/parts.py merge --work /tmp/w --out $OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from cli_parts import fit, kill_resume, knn, stop_children  # beside this file

REPO = Path(__file__).resolve().parents[2]


def _write(path: str, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str), flush=True)


# -- env: interpreter, torch, GPU, the carried wheels and whether their needs are met ------------------


def env(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's own copy
        from pip._vendor.packaging.requirements import Requirement

    record: dict = {"python": sys.executable, "python_version": platform.python_version(), "base_prefix": sys.base_prefix,
                    "host": platform.node(), "cpu_count": os.cpu_count(), "problems": []}  # fmt: skip
    record["wheels"] = {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(Path(args.wheels).glob("*.whl"))}
    record["wheels_mib"] = round(sum(record["wheels"].values()), 1)
    carried = {}
    for info in sorted(Path(args.site).glob("*.dist-info")):
        dist = md.Distribution.at(info)
        unmet = []
        for line in dist.requires or []:
            req = Requirement(line)
            extras = {"signatures", "typing-extensions"} if dist.metadata["Name"] == "jsonargparse" else set()
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{req} (missing)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{req} (have {have})")
        carried[dist.metadata["Name"]] = {"version": dist.version, "unmet": unmet}
        record["problems"] += [f"{dist.metadata['Name']} needs {u}" for u in unmet]
    record["carried"] = carried
    record["image"] = {}
    for name in ("torch", "torchvision", "lightning", "pytorch-lightning", "timm", "numpy", "pillow", "scikit-learn",
                 "safetensors", "tensorboard", "rich", "pyyaml", "onnxruntime"):  # fmt: skip
        try:
            record["image"][name] = md.version(name)
        except md.PackageNotFoundError:
            record["image"][name] = None
    modules = {}
    for module in ("faiss", "torchdata.stateful_dataloader", "jsonargparse", "docstring_parser", "typeshed_client",
                   "webdataset", "litdata", "xcit_ssl", "xcit_ssl.cli", "xcit_ssl.commands.fit", "xcit_ssl.commands.evaluate"):  # fmt: skip
        try:
            modules[module] = getattr(importlib.import_module(module), "__file__", None)
        except Exception as err:  # noqa: BLE001 - the report is the point
            modules[module] = None
            record["problems"].append(f"import {module}: {type(err).__name__}: {err}")
    record["modules"] = modules
    if modules.get("xcit_ssl") and not str(modules["xcit_ssl"]).startswith(str(REPO)):
        record["problems"].append(f"xcit_ssl imported from {modules['xcit_ssl']}, not from {REPO}")
    import torch

    record["torch_cuda"] = torch.version.cuda
    record["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        record["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sm": f"{p.major}.{p.minor}",
                         "multiprocessors": p.multi_processor_count, "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    _write(args.json, record)
    return 1 if record["problems"] else 0


# -- data: ImageNet-sized JPEGs with class structure, and the training pipeline's rate ----------------


def _write_images(job: tuple[str, int, int, int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, first, count, label, width, height = job
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    angle = np.pi * label / 16  # each class: stripes of its own orientation and frequency, over noise
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        phase, freq = rng.uniform(0, 2 * np.pi), 12 + 2 * (label % 5)
        stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) * np.pi + phase)
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = stripes[..., None] * tint + (1 - stripes[..., None]) * rng.uniform(0.0, 0.5, 3)
        rgb += rng.normal(0, 0.06, rgb.shape)  # texture, so that JPEG sizes resemble photos'
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(Path(folder) / f"{i:06d}.JPEG", quality=90)


def write_data(args: argparse.Namespace) -> int:
    """``root/{train,val}/c<NN>/*.JPEG``: the ImageNet layout at ImageNet's typical 500x375."""
    from multiprocessing import Pool

    root, jobs = Path(args.root), []
    if (root / "done").exists():
        print(f"{root}: written before")
        return 0
    start = 0
    for split, n in (("train", args.train), ("val", args.val)):
        for label in range(args.classes):
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            count = n // args.classes + (label < n % args.classes)
            jobs.append((str(folder), start, count, label, args.size[0], args.size[1]))
            start += count
    t = time.perf_counter()
    with Pool(args.procs) as pool:
        pool.map(_write_images, jobs)
    (root / "done").write_text(f"{args.train} train, {args.val} val, {args.classes} classes\n")
    print(f"wrote {start} JPEGs of {args.size[0]}x{args.size[1]} in {time.perf_counter() - t:.1f} s to {root}")
    return 0


def data_pipeline(args: argparse.Namespace) -> int:
    """Training images per second out of the loader: all augmentation in the workers (per_image) vs
    geometry only, photometric half left to the device (what the recipes use)."""
    from xcit_ssl.data.datasets import ImageFolderDataset
    from xcit_ssl.data.resumable import default_sampler, resumable_loader
    from xcit_ssl.data.transforms import MultiCropTransform

    ds = ImageFolderDataset(args.root, "train")
    record: dict = {"workers": args.workers, "batch": args.batch, "images": len(ds), "crops": f"2x{args.global_size} + "
                    f"{args.n_local}x{args.local_size}", "img_per_s": {}}  # fmt: skip
    for mode in ("per_image", "device"):
        transform = MultiCropTransform(global_crop_size=args.global_size, local_crop_size=args.local_size,
                                       n_local_crops=args.n_local, photometric=mode)  # fmt: skip
        data = ds.with_transform(transform)
        loader = resumable_loader(data, default_sampler(data, 1, 0, seed=0), batch_size=args.batch, num_workers=args.workers,
                                  pin_memory=args.pin_memory, persistent_workers=False, drop_last=True)  # fmt: skip
        it = iter(loader)
        next(it)  # workers started, first batch: not counted
        start, n = time.perf_counter(), 0
        for views, _ in it:
            n += views[0].shape[0]
        record["img_per_s"][mode] = round(n / (time.perf_counter() - start), 1) if n else None
    _write(args.json, record)
    return 0


def photometric(args: argparse.Namespace) -> int:
    """The batched photometric half of a training batch on the device, eager vs ``photometric_compile``."""
    import torch

    from xcit_ssl.data.gpu_augment import augment_views, device_augmentations
    from xcit_ssl.data.transforms import MultiCropTransform

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sizes = [args.global_size] * 2 + [args.local_size] * args.n_local
    views = [torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8, device=dev) for s in sizes]
    record: dict = {"device": str(dev), "batch": args.batch, "views": f"2x{args.global_size} + {args.n_local}x{args.local_size}",
                    "compile_backend": os.environ.get("GPU_CHECK_COMPILE_BACKEND", "inductor")}  # fmt: skip
    for name, compile_ in (("eager", False), ("compiled", True)):
        transform = MultiCropTransform(global_crop_size=args.global_size, local_crop_size=args.local_size,
                                       n_local_crops=args.n_local, photometric="device", photometric_compile=compile_)  # fmt: skip
        aug = device_augmentations(transform).to(dev)
        start = time.perf_counter()
        augment_views(views, aug)
        sync()
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            augment_views(views, aug)
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            augment_views(views, aug)
        sync()
        ms = (time.perf_counter() - start) / args.iters * 1000
        record[name] = {"ms_per_batch": round(ms, 2), "img_per_s": round(args.batch / ms * 1000, 1), "first_call_s": round(first, 1)}
    record["compiled_over_eager"] = round(record["compiled"]["img_per_s"] / record["eager"]["img_per_s"], 3)
    _write(args.json, record)
    return 0


# -- record, merge: $OUT/parts.json and one $OUT/results.json with a summary ----------------------------


def record(args: argparse.Namespace) -> int:
    """One part's outcome into ``parts.json`` (rewritten whole, then renamed: a kill leaves the old one)."""
    path = Path(args.out, "parts.json")
    parts = json.loads(path.read_text()) if path.exists() else {"mode": args.mode, "parts": {}}
    if args.name == "-":  # the header: how the check ran
        parts.update(json.loads(args.note))
    else:
        entry = {"status": args.status, "exit_code": args.code, "seconds": args.seconds, "limit_s": args.limit}
        parts["parts"][args.name] = {**entry, "note": args.note} if args.note else entry
        statuses = [p["status"] for p in parts["parts"].values()]
        parts["counts"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    tmp = path.with_name(".parts.json.tmp")
    tmp.write_text(json.dumps(parts, indent=2))
    os.replace(tmp, path)
    return 0


# -- merge --------------------------------------------------------------


def merge(args: argparse.Namespace) -> int:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(Path(args.work, "json").glob("*.json"))}
    summary: dict = {}
    step, fit_ = results.get("step_eager", {}), results.get("fit", {})
    data = results.get("data_pipeline", {}).get("img_per_s", {})
    if step.get("lightning_img_per_s") and data.get("device"):
        summary["step_only_img_per_s"] = step["lightning_img_per_s"]
        summary["data_img_per_s"] = data["device"]
        summary["verdict"] = "data-bound" if data["device"] < step["lightning_img_per_s"] else "compute-bound"
        if fit_.get("exit_code") == 0:
            summary["fit_img_per_s_start_to_exit"] = fit_["img_per_s_start_to_exit"]
            summary["fit_over_step"] = round(fit_["img_per_s_start_to_exit"] / step["lightning_img_per_s"], 3)
    if step.get("mfu_lightning") is not None:
        summary["mfu_lightning"] = step["mfu_lightning"]
    compiled = results.get("step_compiled", {})
    if compiled.get("lightning_img_per_s") and step.get("lightning_img_per_s"):
        summary["compiled_over_eager_step"] = round(compiled["lightning_img_per_s"] / step["lightning_img_per_s"], 3)
    kr = results.get("kill_resume", {})
    if "resumed_vs_auto" in kr:
        summary["kill_resume"] = {"strategy": kr["strategy"], "same_final_step": kr.get("same_final_step"),
                                  "max_abs_diff_vs_auto": kr["resumed_vs_auto"]["max_abs_diff"],
                                  "max_abs_diff_vs_uninterrupted": kr["resumed_vs_uninterrupted"]["max_abs_diff"]}  # fmt: skip
    if results.get("knn", {}).get("train_features_img_per_s"):
        summary["knn_features_img_per_s"] = results["knn"]["train_features_img_per_s"]
    results["summary"] = summary
    tmp = Path(args.out, ".results.json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, Path(args.out, "results.json"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("env")
    p.add_argument("--site", required=True)
    p.add_argument("--wheels", required=True)
    p.add_argument("--json", required=True)
    p = sub.add_parser("write-data")
    p.add_argument("--root", required=True)
    p.add_argument("--train", type=int, default=1600)
    p.add_argument("--val", type=int, default=320)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    for name in ("data-pipeline", "photometric"):
        p = sub.add_parser(name)
        p.add_argument("--json", required=True)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--global_size", type=int, default=224)
        p.add_argument("--local_size", type=int, default=96)
        p.add_argument("--n_local", type=int, default=8)
        if name == "data-pipeline":
            p.add_argument("--root", required=True)
            p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
            p.add_argument("--pin_memory", action="store_true")
        else:
            p.add_argument("--device", default="cuda")
            p.add_argument("--warmup", type=int, default=3)
            p.add_argument("--iters", type=int, default=20)
    for name in ("fit", "kill-resume", "knn"):
        p = sub.add_parser(name)
        p.add_argument("--json", required=True)
        p.add_argument("--work", required=True)
        p.add_argument("flags", nargs="*", help="after --: flags of the command")
        if name in ("fit", "kill-resume"):
            p.add_argument("--steps", type=int, default=50)
            p.add_argument("--batch", type=int, default=64)
        if name == "kill-resume":
            p.add_argument("--strategy", default="fsdp")
            p.add_argument("--every", type=int, default=10, help="checkpoint every N steps; SIGTERM after the first")
            p.add_argument("--note", default="")
        if name == "knn":
            p.add_argument("--root", required=True)
            p.add_argument("--checkpoint", default="")
            p.add_argument("--backbone", default="xcit_small_12_p16_224", help="random init when there is no checkpoint")
    p = sub.add_parser("record")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="device")
    p.add_argument("--name", required=True, help="the part, or - for the header (--note: a JSON object)")
    p.add_argument("--status", default="")
    p.add_argument("--code", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--note", default="")
    p = sub.add_parser("merge")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_children)
    if hasattr(args, "work"):
        Path(args.work).mkdir(parents=True, exist_ok=True)
    from xcit_ssl.console import quiet_third_party  # the CLI's filter of library notices, for the parts run here

    with quiet_third_party():
        return {"env": env, "write-data": write_data, "data-pipeline": data_pipeline, "photometric": photometric,
                "fit": fit, "kill-resume": kill_resume, "knn": knn, "record": record, "merge": merge}[args.part](args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
