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

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import Unreadable, open_dataset, skipping_unreadable
from ..data.supervised import build_supervised_eval_transform, eval_resize_size
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_KEY = "ema"
FMNIST_PAD = 32  # the demo recipes train on Fashion-MNIST zero-padded to 32 px


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="xcit-ssl validate", exit_on_error=False, default_meta=False,
        description="Top-1/top-5 accuracy of an XCiT classifier (checkpoint or weight file) on a labelled split.",
    )  # fmt: skip
    p.add_argument("--checkpoint", type=Optional[str], default=None, help="training checkpoint (*.ckpt) of ours")
    p.add_argument("--weights", type=Optional[str], default=None,
                   help="a classifier weight file (timm / official XCiT / mmpretrain / exported)")  # fmt: skip
    p.add_argument("--backbone", type=Optional[str], default=None,
                   help="timm variant name when the file does not record it, e.g. xcit_small_12_p16_224")  # fmt: skip
    p.add_argument("--checkpoint_key", type=str, default=DEFAULT_CHECKPOINT_KEY,
                   help="network of a multi-network file: ema (model EMA, default) or backbone (raw) in ours; "
                        "files with one network ignore it")  # fmt: skip
    p.add_argument("--data.dataset", type=Literal["imagefolder", "fashion_mnist", "webdataset", "litdata"], default="imagefolder",
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


def _source(cfg: Namespace) -> Path:
    if cfg.checkpoint and cfg.weights:
        raise UserError("pass either --checkpoint or --weights, not both")
    raw = cfg.checkpoint or cfg.weights
    if not raw:
        raise UserError("no weights given: pass --checkpoint PATH or --weights PATH [--backbone NAME]")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    return path


def load_classifier(source: Path, checkpoint_key: str, backbone: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier in eval mode and what the file records (``img_size``, ``mean``, ``std``)."""
    from ..models.checkpoint_files import load_checkpoint_file
    from ..models.checkpoints import load_backbone, read_state_dict

    _refuse_dino(source)  # before the checkpoint key: DINO's teacher/student would be asked for first
    state = read_state_dict(str(source), checkpoint_key=checkpoint_key)
    if "head.weight" not in state:
        raise UserError(
            f"{source} has no classifier head (a DINO checkpoint or an exported backbone?): validate needs a "
            "classifier; evaluate backbones with `xcit-ssl knn` or `xcit-ssl linear`"
        )
    model = load_backbone(str(source), checkpoint_key=checkpoint_key, name=backbone,
                          num_classes=int(state["head.weight"].shape[0]))  # fmt: skip
    obj, metadata = load_checkpoint_file(source)
    entry: Any = obj.get("xcit_ssl") if isinstance(obj, dict) else None
    if metadata.get("xcit_ssl"):
        import json

        entry = json.loads(metadata["xcit_ssl"])
    recorded = {k: entry[k] for k in ("img_size", "mean", "std") if isinstance(entry, dict) and entry.get(k)}
    return model.eval(), recorded


def _refuse_dino(source: Path) -> None:
    """A DINO checkpoint (ours or the official one) or an export of a DINO backbone has no classifier."""
    import json

    from ..models.checkpoint_files import load_checkpoint_file

    obj, metadata = load_checkpoint_file(source)
    entry: Any = obj.get("xcit_ssl") if isinstance(obj, dict) else None
    if metadata.get("xcit_ssl"):
        try:
            entry = json.loads(metadata["xcit_ssl"])
        except json.JSONDecodeError:
            entry = None
    state = obj.get("state_dict") if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else {}
    dino = (isinstance(entry, dict) and entry.get("method") == "dino") or (
        isinstance(obj, dict) and {"teacher", "student"} <= set(obj)  # DINO's own checkpoints
    ) or any(str(k).startswith("teacher_backbone.") for k in state)
    if dino:
        raise UserError(
            f"{source} is a DINO checkpoint: DINO trains a backbone without a classifier head, so there is no "
            f"classifier to validate. Measure its features instead: xcit-ssl knn --checkpoint {source} "
            f"--data.root DATA (weighted k-NN), or xcit-ssl linear --checkpoint {source} --data.root DATA (linear probe)"
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device({"gpu": "cuda"}.get(name, name))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> dict[str, float]:
    """top-1 / top-5 (%) and mean cross-entropy of ``model`` over ``loader``."""
    hits1 = hits5 = 0
    loss_sum, n = 0.0, 0
    k = min(5, num_classes)
    model.to(device)
    for images, labels in loader:
        if len(labels) == 0:  # every file of the batch was unreadable
            continue
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        top = logits.topk(k, dim=-1).indices
        hits1 += int((top[:, 0] == labels).sum())
        hits5 += int((top == labels[:, None]).any(dim=-1).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    if n == 0:
        raise UserError("the evaluation split holds no images")
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "loss": loss_sum / n, "num_images": n}


def _collate_readable(samples: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [B, 3, H, W], labels [B])`` of the readable samples; the others are logged."""
    for image, _ in samples:
        if isinstance(image, Unreadable):
            log.warning("validate: left out unreadable image %s (%s)", image.path, image.reason)
    good = [(image, label) for image, label in samples if not isinstance(image, Unreadable)]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good], dtype=torch.int64)


def _open_split(cfg: Namespace, transform: Any) -> Any:
    from ..data.datasets import subset

    d = cfg.data
    if d.dataset == "imagefolder":
        if not d.root:
            raise UserError("--data.root is required for imagefolder data (the folder holding train/ and val/)")
        if d.pad_to is not None:
            raise UserError("--data.pad_to applies to fashion_mnist only")
        train_dir = Path(d.root) / "train"
        # index the classes like training did (sorted train folders) when the train split is there
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")) if (
            train_dir.is_dir() and cfg.split != "train") else None  # fmt: skip
        dataset = open_dataset("imagefolder", d.root, cfg.split, classes=classes)
    else:
        dataset = open_dataset("fashion_mnist", d.root, cfg.split, pad_to=d.pad_to or FMNIST_PAD)
    if cfg.limit:
        dataset = subset(dataset, cfg.limit, 0)
    return dataset.with_transform(transform)


def validate_main(argv: list[str]) -> int:
    """``xcit-ssl validate``; returns 0. User mistakes raise :class:`UserError`."""
    from ..evaluation.commands import write_json_atomic

    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
    except ArgumentError as err:
        raise UserError(f"{str(err).splitlines()[0]} (xcit-ssl validate --help lists the options)") from None
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size}: use a positive batch size")
    source = _source(cfg)
    model, recorded = load_classifier(source, cfg.checkpoint_key, cfg.backbone)
    img_size = int(cfg.img_size or recorded.get("img_size") or getattr(model, "img_size", 224))
    if img_size % model.patch_size:
        raise UserError(f"--img_size={img_size} is not a multiple of the patch size {model.patch_size}")
    mean = tuple(recorded.get("mean") or IMAGENET_MEAN)
    std = tuple(recorded.get("std") or IMAGENET_STD)
    transform = build_supervised_eval_transform(img_size, cfg.crop_pct, mean, std, cfg.interpolation)
    dataset = _open_split(cfg, transform)
    classes = getattr(dataset, "classes", None) or []
    if classes and len(classes) != model.num_classes:
        raise UserError(
            f"the classifier predicts {model.num_classes} classes but the {cfg.split} split has {len(classes)}: "
            "validate on the data set it was trained on"
        )
    device = _device(cfg.device)
    # evaluation's policy: an unreadable file is left out and counted, not replaced by its neighbour
    loader = DataLoader(skipping_unreadable(dataset), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", collate_fn=_collate_readable)  # fmt: skip
    start = time.perf_counter()
    metrics = evaluate_classifier(model, loader, model.num_classes, device)
    metrics["unreadable"] = len(dataset) - int(metrics["num_images"])
    seconds = time.perf_counter() - start
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / "eval" / f"validate_{cfg.split}_{source.stem}.json"
    record = {
        "command": "validate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": {"path": str(source.resolve()), "checkpoint_key": cfg.checkpoint_key,
                    "backbone": getattr(model, "variant_name", cfg.backbone), "num_classes": model.num_classes},
        "data": {"dataset": cfg.data.dataset, "root": cfg.data.root, "split": cfg.split, "limit": cfg.limit},
        "transform": {"img_size": img_size, "crop_pct": cfg.crop_pct, "resize_size": eval_resize_size(img_size, cfg.crop_pct),
                      "interpolation": cfg.interpolation, "mean": list(mean), "std": list(std)},
        **metrics,
        "seconds": round(seconds, 2),
    }  # fmt: skip
    write_json_atomic(out, record)
    _print_result(source, cfg, metrics, img_size, out)
    return 0


def _print_result(source: Path, cfg: Namespace, metrics: dict[str, float], img_size: int, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"validate {source.name} ({cfg.checkpoint_key}) on {cfg.data.dataset}:{cfg.split}")
    for col in ("images", "img_size", "crop_pct", "top-1 %", "top-5 %", "loss"):
        table.add_column(col, justify="right")
    images = f"{metrics['num_images']}" + (f" ({metrics['unreadable']} unreadable left out)" if metrics.get("unreadable") else "")
    table.add_row(images, str(img_size), f"{cfg.crop_pct:g}", f"{metrics['top1']:.2f}",
                  f"{metrics['top5']:.2f}", f"{metrics['loss']:.4f}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"result: {out}", soft_wrap=True, highlight=False)
