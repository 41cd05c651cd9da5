"""``xcit-ssl validate``: top-1/top-5 of a classifier on a labelled folder or Fashion-MNIST.

    xcit-ssl validate --checkpoint runs/sup_small_p16/checkpoints/last.ckpt --data.root /data/imagenet
    xcit-ssl validate --weights xcit_small_12_p16_224.pth --backbone xcit_small_12_p16_224 --data.root ...
    xcit-ssl validate --checkpoint runs/sup_nano_fmnist/checkpoints/last.ckpt --data.dataset fashion_mnist

Weights: ``--checkpoint`` (ours: the EMA network by default, ``--checkpoint_key backbone`` for the
raw one; the key is ignored by files with one network) or ``--weights`` (timm / official XCiT /
mmpretrain / exported files; ``--backbone`` names the variant when the file does not record it).
The number of classes comes from the file's head. Transform: resize ``floor(img_size / crop_pct)``,
center crop ``img_size`` (XCiT protocol: crop ratio 1.0); ``img_size`` defaults to the training
resolution the checkpoint records, else the variant's. Prints a table and writes a JSON result.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from jsonargparse import ArgumentError, ArgumentParser, Namespace
from torch.utils.data import DataLoader

from ..console import print_table
from ..data.datasets import DatasetKind
from ..data.images import skipping_unreadable
from ..data.supervised import build_supervised_eval_transform, eval_resize_size
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..devices import torch_device
from ..errors import UserError
from ..evaluation.classifier import FMNIST_PAD, collate_readable, evaluate_classifier, load_classifier, open_validation_split
from ..evaluation.metrics import top5_applies, top5_note
from ..evaluation.weights import resolve_weights
from ..files import check_writable, run_dir_of, write_json
from .weights_flags import add_weights_arguments

DEFAULT_CHECKPOINT_KEY = "ema"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="xcit-ssl validate", exit_on_error=False, default_meta=False,
        description="Top-1/top-5 accuracy of an XCiT classifier (checkpoint or weight file) on a labelled split.",
    )  # fmt: skip
    add_weights_arguments(p)
    p.add_argument("--checkpoint_key", type=str, default=DEFAULT_CHECKPOINT_KEY,
                   help="network of a multi-network file: ema (model EMA, default) or backbone (raw) in ours; "
                        "files with one network ignore it")  # fmt: skip
    p.add_argument("--data.dataset", type=DatasetKind, default="imagefolder",
                   help="imagefolder: <root>/<split>/<class>/*; fashion_mnist: the installed copy by default")  # fmt: skip
    p.add_argument("--data.root", type=Optional[str], default=None, help="data folder")
    p.add_argument("--data.pad_to", type=Optional[int], default=None,
                   help=f"fashion_mnist only: zero-pad 28 px to this size (default {FMNIST_PAD}, as the demo trains)")  # fmt: skip
    p.add_argument("--split", type=str, default="val", help="split to evaluate (val; fashion_mnist: val/test)")
    p.add_argument("--crop_pct", type=float, default=1.0, help="crop ratio (XCiT: 1.0, DeiT: 0.875)")
    p.add_argument("--img_size", type=Optional[int], default=None,
                   help="crop size; default the checkpoint's training size, else the variant's")  # fmt: skip
    p.add_argument("--interpolation", type=Literal["bicubic", "bilinear"], default="bicubic", help="resize mode")
    p.add_argument("--batch_size", type=int, default=128, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading workers")
    p.add_argument("--limit", type=Optional[int], default=None, help="evaluate a class-stratified subset of N images")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--out", type=Optional[str], default=None,
                   help="JSON result (default: <run>/eval/validate_<split>_<file stem>.json)")  # fmt: skip
    return p


def validate_main(argv: list[str]) -> int:
    """``xcit-ssl validate``; returns 0. User mistakes raise :class:`UserError`."""
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as err:
        raise UserError(f"{str(err).splitlines()[0]} (xcit-ssl validate --help lists the options)") from None
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size}: use a positive batch size")
    source, _ = resolve_weights(cfg.checkpoint, cfg.weights, None)
    out = Path(cfg.out).expanduser() if cfg.out else run_dir_of(source) / "eval" / f"validate_{cfg.split}_{source.stem}.json"
    check_writable(out.parent, "--out", out)  # before the evaluation, not after it
    model, recorded = load_classifier(source, cfg.checkpoint_key, cfg.backbone)
    img_size = int(cfg.img_size or recorded.get("img_size") or getattr(model, "img_size", 224))
    if img_size % model.patch_size:
        raise UserError(f"--img_size={img_size} is not a multiple of the patch size {model.patch_size}")
    mean = tuple(recorded.get("mean") or IMAGENET_MEAN)
    std = tuple(recorded.get("std") or IMAGENET_STD)
    transform = build_supervised_eval_transform(img_size, cfg.crop_pct, mean, std, cfg.interpolation)
    dataset = open_validation_split(cfg, transform)
    classes = getattr(dataset, "classes", None) or []
    if classes and len(classes) != model.num_classes:
        raise UserError(
            f"the classifier predicts {model.num_classes} classes but the {cfg.split} split has {len(classes)}: "
            "validate on the data set it was trained on"
        )
    device = torch_device(cfg.device)
    # evaluation's policy: an unreadable file is left out and counted, not replaced by its neighbour
    loader = DataLoader(skipping_unreadable(dataset), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", collate_fn=collate_readable)  # fmt: skip
    start = time.perf_counter()
    metrics = evaluate_classifier(model, loader, model.num_classes, device)
    metrics["unreadable"] = len(dataset) - int(metrics["num_images"])
    notes = [] if top5_applies(model.num_classes) else [top5_note(model.num_classes)]
    if notes:  # with 5 classes or fewer every prediction has the true class in its top 5
        metrics["top5"] = None
    seconds = time.perf_counter() - start
    record = {
        "command": "validate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"path": str(source.resolve()), "checkpoint_key": cfg.checkpoint_key,
                    "backbone": getattr(model, "variant_name", cfg.backbone), "num_classes": model.num_classes},
        "data": {"dataset": cfg.data.dataset, "root": cfg.data.root, "split": cfg.split, "limit": cfg.limit},
        "transform": {"img_size": img_size, "crop_pct": cfg.crop_pct, "resize_size": eval_resize_size(img_size, cfg.crop_pct),
                      "interpolation": cfg.interpolation, "mean": list(mean), "std": list(std)},
        **metrics,
        "notes": notes,
        "seconds": round(seconds, 2),
    }  # fmt: skip
    write_json(out, record)
    _print_result(source, cfg, metrics, img_size, out, notes)
    return 0


def _print_result(source: Path, cfg: Namespace, metrics: dict[str, Any], img_size: int, out: Path,
                  notes: list[str]) -> None:  # fmt: skip
    images = f"{metrics['num_images']}" + (f" ({metrics['unreadable']} unreadable left out)" if metrics.get("unreadable") else "")
    top5 = "-" if metrics["top5"] is None else f"{metrics['top5']:.2f}"
    row = (images, img_size, f"{cfg.crop_pct:g}", f"{metrics['top1']:.2f}", top5, f"{metrics['loss']:.4f}")
    print_table(f"validate {source.name} ({cfg.checkpoint_key}) on {cfg.data.dataset}:{cfg.split}",
                ("images", "img_size", "crop_pct", "top-1 %", "top-5 %", "loss"), [row],
                footer="".join(f"{note}\n" for note in notes) + f"result: {out}")
