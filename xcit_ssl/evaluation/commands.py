"""``xcit-ssl knn`` and ``xcit-ssl linear``: parse, load the backbone, extract (cached), evaluate,
print a table, write a JSON result.

Both take a protocol (``--protocol knn_fmnist``, a name from ``eval/`` or a YAML path) whose
values any flag can override (``--data.root``, ``--knn.ks [20]``, ``--linear.epochs 10``), and
the weights as ``--checkpoint PATH`` (a training checkpoint, teacher by default) or
``--weights PATH [--backbone NAME]`` (an exported backbone or a timm / official / DINO /
mmpretrain file). Mistakes a user can make raise :class:`~xcit_ssl.errors.UserError`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from .. import __version__
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .features import (
    CLSFeatures,
    FeatureCache,
    POOLING_PYRAMID,
    POOLING_WIDTH,
    FeatureSet,
    RawPixels,
    cached_features,
    extract_features,
    quiet_lightning_info,
    sha256_file,
)
from .eval_data import check_classes, evaluated_note, unreadable_record
from .knn import knn_evaluate
from .protocol import DataConfig, FeatureConfig, KNNConfig, LinearConfig, find_protocol, transform_description

log = logging.getLogger(__name__)


# -- parsing -------------------------------------------------------------------------------------


_DESCRIPTIONS = {
    "knn": "Weighted k-NN accuracy (DINO protocol: cosine, exp(sim/0.07) votes, k = 10/20/100/200) of a "
    "backbone's frozen CLS features. Values come from --protocol; any flag overrides them.",
    "linear": "Linear-probe accuracy (DINO protocol: frozen backbone, SGD, cosine, RandomResizedCrop + flip; "
    "--linear.fast true: cached features, no augmentation). Values come from --protocol; flags override them.",
}


def add_weights_arguments(parser: ArgumentParser, random_init_help: str) -> None:
    """``--checkpoint`` / ``--weights`` / ``--backbone`` / ``--random_init``: where a command's backbone
    comes from (read by :func:`_weights_source`); shared by knn, linear and attention."""
    parser.add_argument("--checkpoint", type=Optional[str], default=None,
                        help="training checkpoint (*.ckpt) or exported backbone (*.safetensors)")
    parser.add_argument("--weights", type=Optional[str], default=None,
                        help="a backbone weight file (timm / official XCiT / DINO / mmpretrain / exported)")
    parser.add_argument("--backbone", type=Optional[str], default=None,
                        help="timm variant name for --weights files that do not record it, e.g. xcit_small_12_p16_224")
    parser.add_argument("--random_init", type=Optional[str], default=None, help=random_init_help)


def _build_parser(command: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"xcit-ssl {command}", description=_DESCRIPTIONS[command], default_meta=False)
    parser.add_argument("--protocol", action=ActionConfigFile,
                        help=f"protocol name in eval/ (e.g. {command}_imagenet, {command}_fmnist) or YAML path")
    add_weights_arguments(parser, "evaluate a randomly initialised backbone (seed 0), the baseline that pretrained "
                                  "features must beat: a variant name (xcit_nano_12_p8_224) or a checkpoint whose "
                                  "architecture, e.g. a recipe's fewer blocks, to initialise afresh")
    parser.add_argument("--raw_pixels", type=bool, nargs="?", const=True, default=False,
                        help="evaluate the protocol's transformed pixels themselves (no network): the baseline "
                             "that any learned feature must beat")
    parser.add_argument("--checkpoint_key", type=str, default="teacher",
                        help="which network of a training checkpoint: teacher (DINO protocol) or student")
    parser.add_class_arguments(DataConfig, "data")
    parser.add_class_arguments(FeatureConfig, "features")
    if command == "knn":
        parser.add_class_arguments(KNNConfig, "knn")
    else:
        parser.add_class_arguments(LinearConfig, "linear")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="JSON result path (default: <run>/eval/<protocol>_<checkpoint file stem>.json)")
    parser.add_argument("--cache_dir", type=Optional[str], default=None,
                        help="feature cache folder (default: <run>/eval/feature_cache)")
    parser.add_argument("--no_cache", type=bool, nargs="?", const=True, default=False, help="neither read nor write cached features")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, gpu/cuda or mps")
    parser.add_argument("--devices", type=int, default=1, help="number of devices (>1: DDP through Lightning)")
    parser.add_argument("--precision", type=str, default="32-true",
                        help="32-true (exact protocol) or bf16-mixed (about 2x faster on recent GPUs)")
    parser.add_argument("--batch_size", type=int, default=256, help="feature-extraction batch per device")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading workers")
    parser.add_argument("--progress", type=bool, nargs="?", const=True, default=True, help="show progress bars")
    return parser


def _parse(command: str, argv: list[str]) -> tuple[Namespace, str]:
    """Parse with the protocol's YAML applied first, so that every other flag overrides it."""
    argv = list(argv)
    protocol = f"{command}_imagenet"
    for i, arg in enumerate(argv):
        if arg == "--protocol" and i + 1 < len(argv):
            protocol = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--protocol="):
            protocol = arg.split("=", 1)[1]
            del argv[i]
            break
    parser = _build_parser(command)
    if any(a in ("-h", "--help") for a in argv):
        parser.parse_args(argv)  # prints help and exits; no protocol lookup needed
    path = find_protocol(protocol, prefix=command)
    cfg = parser.parse_args(["--protocol", str(path), *argv])
    return cfg, path.stem


# -- shared steps --------------------------------------------------------------------------------


_ARCH_KEYS = ("depth", "embed_dim", "num_heads", "cls_attn_layers", "patch_size")


def _random_init_weights(name: str, overrides: dict[str, Any] | None = None,
                         folder: Path = Path("runs") / "random_init") -> Path:  # fmt: skip
    """A seed-0 random initialisation of ``name`` (with architecture ``overrides``, e.g. a recipe's
    fewer blocks) as a safetensors file recording its variant: same file, same hash, every time."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from ..models import create_backbone  # noqa: PLC0415

    overrides = {k: int(v) for k, v in (overrides or {}).items() if k in _ARCH_KEYS}
    tag = "".join(f"_{k}{v}" for k, v in sorted(overrides.items()))
    path = folder / f"{name}{tag}_seed0.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_backbone(name, num_classes=0, **overrides)
        tmp = path.with_suffix(".tmp")
        metadata = {"xcit_ssl": json.dumps({"name": name, "overrides": overrides})}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    return path


def _random_init_source(value: str) -> tuple[str, dict[str, Any]]:
    """``--random_init``: a variant name, or a checkpoint/export whose architecture (variant and
    overrides such as a recipe's depth) is re-initialised, so the baseline is the same network."""
    from ..models.registry import VARIANTS  # noqa: PLC0415

    if value in VARIANTS:
        return value, {}
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--random_init {value}: neither an XCiT variant (xcit-ssl models lists them) nor a "
                        "checkpoint file; pass e.g. --random_init xcit_nano_12_p8_224 or "
                        "--random_init runs/x/checkpoints/last.ckpt (its architecture, freshly initialised)")  # fmt: skip
    from ..models.checkpoints import load_backbone  # noqa: PLC0415

    model = load_backbone(str(path), num_classes=0)
    return model.variant_name, dict(getattr(model, "build_args", {}))  # type: ignore[arg-type]


def _weights_source(cfg: Namespace) -> Path:
    if cfg.random_init:
        if cfg.checkpoint or cfg.weights:
            raise UserError("--random_init evaluates a fresh backbone: drop --checkpoint/--weights")
        name, overrides = _random_init_source(cfg.random_init)
        cfg.backbone = name
        return _random_init_weights(name, overrides)
    if cfg.checkpoint and cfg.weights:
        raise UserError("pass either --checkpoint or --weights, not both")
    source = cfg.checkpoint or cfg.weights
    if not source:
        raise UserError("no weights given: pass --checkpoint PATH (a training checkpoint or exported "
                        "backbone) or --weights PATH --backbone NAME")  # fmt: skip
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    return path


def _run_dir(source: Path) -> Path:
    # runs/<name>/checkpoints/last.ckpt -> runs/<name>; any other file -> its folder
    return source.parent.parent if source.parent.name == "checkpoints" else source.parent


def _load_features_model(cfg: Namespace, source: Path) -> tuple[CLSFeatures, dict[str, Any]]:
    from ..models.checkpoints import load_backbone  # noqa: PLC0415

    backbone = load_backbone(str(source), checkpoint_key=cfg.checkpoint_key, name=cfg.backbone, num_classes=0)
    spec = _training_stats(source)
    if cfg.features.crop_size % backbone.patch_size:
        raise UserError(f"features.crop_size={cfg.features.crop_size} is not a multiple of the backbone's "
                        f"patch size {backbone.patch_size}: pick a multiple (e.g. 224 or 32)")  # fmt: skip
    side = max(POOLING_PYRAMID.get(cfg.features.pooling, (0,)))
    if side and cfg.features.crop_size < side * backbone.patch_size:
        raise UserError(f"features.pooling={cfg.features.pooling} needs at least a {side}x{side} patch grid: pass "
                        f"--features.crop_size {side * backbone.patch_size} or more, or --features.pooling "
                        f"{'cls+pyramid' if side > 2 else 'cls+mean_patch'}")  # fmt: skip
    dim = backbone.embed_dim * POOLING_WIDTH[cfg.features.pooling]
    info = {"backbone": getattr(backbone, "variant_name", cfg.backbone), "embed_dim": dim,
            "patch_size": backbone.patch_size, "spec": spec}  # fmt: skip
    return CLSFeatures(backbone, cfg.features.pooling), info


def _training_stats(source: Path) -> dict[str, Any]:
    """``mean``/``std``/``img_size`` an xcit-ssl checkpoint or export records (empty otherwise)."""
    from ..models.checkpoint_files import load_checkpoint_file  # noqa: PLC0415

    obj, metadata = load_checkpoint_file(source)  # memory-mapped: cheap even for big checkpoints
    entry: Any = None
    if metadata.get("xcit_ssl"):
        try:
            entry = json.loads(metadata["xcit_ssl"])
        except json.JSONDecodeError:
            entry = None
    elif isinstance(obj, dict):
        entry = obj.get("xcit_ssl")
    if not isinstance(entry, dict):
        return {}
    return {k: entry[k] for k in ("mean", "std", "img_size") if entry.get(k) is not None}


def _mean_std(cfg: Namespace, spec: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Protocol values, or (when null) the checkpoint's training statistics, else ImageNet's."""
    mean = cfg.features.mean or spec.get("mean") or list(IMAGENET_MEAN)
    std = cfg.features.std or spec.get("std") or list(IMAGENET_STD)
    return [float(m) for m in mean], [float(s) for s in std]


def _open_splits(cfg: Namespace) -> dict[str, Any]:
    from ..data.datasets import open_dataset, skipping_unreadable, subset  # noqa: PLC0415

    d = cfg.data
    if d.dataset != "fashion_mnist" and not d.root:
        raise UserError(f"--data.root is required for dataset '{d.dataset}' (the folder holding "
                        f"{d.train_split}/ and {d.val_split}/)")  # fmt: skip
    if d.pad_to is not None and d.dataset != "fashion_mnist":
        raise UserError(f"data.pad_to applies to fashion_mnist only; remove it for dataset '{d.dataset}'")
    train = open_dataset(d.dataset, d.root, d.train_split, pad_to=d.pad_to)
    train_classes = getattr(train, "classes", None)
    # val labels are indexed by the train classes, so a val split lacking a class still lines up
    extra = {"classes": train_classes} if d.dataset == "imagefolder" else {"pad_to": d.pad_to}
    val = open_dataset(d.dataset, d.root, d.val_split, **extra)
    sizes = {"train": len(train), "val": len(val)}
    if d.n_train and d.n_train < len(train):
        train = subset(train, d.n_train, d.seed)
    if d.n_val and d.n_val < len(val):
        val = subset(val, d.n_val, d.seed)
    # evaluation leaves unreadable files out (training replaces them by a neighbour)
    return {"train": skipping_unreadable(train), "val": skipping_unreadable(val), "full_sizes": sizes,
            "num_classes": len(train_classes) if train_classes is not None else None}  # fmt: skip


def _features(cfg: Namespace, split: str, dataset: Any, model: CLSFeatures, transform: Any,
              key_parts: dict[str, Any], cache: FeatureCache | None) -> tuple[FeatureSet | None, bool, float]:  # fmt: skip
    d = cfg.data
    n_sub = d.n_train if split == "train" else d.n_val
    root = str(Path(d.root).expanduser().resolve()) if d.root else None
    parts = {**key_parts, "dataset": d.dataset, "root": root, "precision": cfg.precision, "pad_to": d.pad_to,
             "split": d.train_split if split == "train" else d.val_split, "num_images": len(dataset),
             "subset": [n_sub, d.seed] if n_sub else None}  # fmt: skip
    start = time.perf_counter()
    result, hit = cached_features(
        cache, FeatureCache.make_key(**parts), parts,
        lambda: extract_features(model, dataset, transform, cfg.batch_size, cfg.num_workers,
                                 _accelerator(cfg.device), cfg.devices, cfg.precision, cfg.progress),
    )  # fmt: skip
    return result, hit, time.perf_counter() - start


def _resolved_root(data: Namespace) -> str | None:
    from ..data.datasets import FASHION_MNIST_ROOT  # noqa: PLC0415

    root = data.root or (FASHION_MNIST_ROOT if data.dataset == "fashion_mnist" else None)
    return str(Path(root).expanduser().resolve()) if root and "://" not in str(root) else root


def _accelerator(device: str) -> str:
    return {"cuda": "gpu"}.get(device, device)


def _prepare(command: str, cfg: Namespace, protocol: str) -> dict[str, Any]:
    """Everything both commands share: weights, hash, model, transform, splits, cache, out path."""
    if cfg.raw_pixels:
        if cfg.checkpoint or cfg.weights or cfg.random_init:
            raise UserError("--raw_pixels evaluates the images themselves: drop --checkpoint/--weights/--random_init")
        source = Path("runs") / "raw_pixels" / "pixels"
        run_dir = source.parent
    else:
        source = _weights_source(cfg)
        run_dir = _run_dir(source)
    splits = _open_splits(cfg)  # before the weights: a data set that cannot be evaluated fails at once
    num_classes = check_classes(command, splits["train"], cfg.data)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else run_dir / "eval" / "feature_cache"
    cache = None if cfg.no_cache else FeatureCache(cache_dir)
    if cfg.raw_pixels:
        sha = "raw_pixels"
        model: Any = RawPixels()
        info = {"backbone": "raw_pixels", "embed_dim": 3 * cfg.features.crop_size**2, "patch_size": 1, "spec": {}}
    else:
        sha = sha256_file(source, None if cfg.no_cache else cache_dir / "sha256_index.json")
        model, info = _load_features_model(cfg, source)
    mean, std = _mean_std(cfg, info["spec"])
    from .protocol import build_feature_transform  # noqa: PLC0415

    f = cfg.features
    transform = build_feature_transform(f.resize_size, f.crop_size, mean, std, f.interpolation)
    key_parts = {"weights_sha256": sha, "checkpoint_key": cfg.checkpoint_key, "backbone": info["backbone"],
                 "transform": transform_description(f, mean, std)}  # fmt: skip
    stem = protocol if protocol.startswith(command) else f"{command}_{protocol}"
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / "eval" / f"{stem}_{source.stem}.json"
    record = {
        "command": command, "protocol": protocol, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "xcit_ssl_version": __version__,
        "weights": {"path": "raw pixels" if cfg.raw_pixels else str(source.resolve()), "sha256": sha, "checkpoint_key": cfg.checkpoint_key,
                    "backbone": info["backbone"], "embed_dim": info["embed_dim"]},
        "protocol_config": {"data": asdict(DataConfig(**vars(cfg.data))),
                            "features": {**transform_description(f, mean, std)}},
        "num_images": {"train": len(splits["train"]), "val": len(splits["val"])},
        "split_sizes": splits["full_sizes"], "num_classes": num_classes,
        # what was evaluated, in full: a protocol name alone does not say (knn_imagenet on a toy folder)
        "data": {"dataset": cfg.data.dataset, "root": _resolved_root(cfg.data), "train_split": cfg.data.train_split,
                 "val_split": cfg.data.val_split, "n_train": cfg.data.n_train, "n_val": cfg.data.n_val},
    }  # fmt: skip
    return {"source": source, "cache": cache, "model": model, "info": info, "transform": transform,
            "splits": splits, "key_parts": key_parts, "out": out, "record": record}  # fmt: skip


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same folder, then rename: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _print_table(title: str, columns: list[str], rows: list[list[str]], footer: str) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=title, min_width=len(title) + 2)
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(footer, soft_wrap=True, highlight=False)


def _compute_device(cfg: Namespace) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.device in ("auto", "gpu", "cuda") else "cpu"


def _run_linear_probe(cfg: Namespace, job: dict[str, Any]) -> dict[str, Any] | None:
    """The protocol: augmented images through the frozen backbone, Lightning ``fit``."""
    import lightning.pytorch as pl  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from .features import TransformedDataset, collate_readable  # noqa: PLC0415
    from .linear import LinearProbe, build_linear_train_transform, history_as_dict  # noqa: PLC0415

    lin, f, splits = cfg.linear, cfg.features, job["splits"]
    stats = job["record"]["protocol_config"]["features"]
    with quiet_lightning_info():
        trainer = pl.Trainer(
            accelerator=_accelerator(cfg.device), devices=cfg.devices, precision=cfg.precision,
            max_epochs=lin.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=cfg.progress, num_sanity_val_steps=0,
            check_val_every_n_epoch=lin.val_every_n_epochs, default_root_dir=job["out"].parent,
        )  # fmt: skip
    per_device = max(1, lin.batch_size // trainer.world_size)
    train_tf = build_linear_train_transform(f.crop_size, tuple(lin.crop_scale), stats["mean"], stats["std"],
                                            lin.train_interpolation)  # fmt: skip
    workers = {"num_workers": cfg.num_workers, "pin_memory": torch.cuda.is_available(),
               "persistent_workers": cfg.num_workers > 0}  # fmt: skip
    train_loader = DataLoader(TransformedDataset(splits["train"], train_tf), per_device, shuffle=True,
                              collate_fn=collate_readable, **workers)  # fmt: skip
    val_loader = DataLoader(TransformedDataset(splits["val"], job["transform"]), cfg.batch_size,
                            collate_fn=collate_readable, **workers)  # fmt: skip
    module = LinearProbe(job["model"], job["info"]["embed_dim"], splits["num_classes"] or _num_classes(splits),
                         lin.epochs, lin.base_lr, lin.momentum, lin.weight_decay, per_device)  # fmt: skip
    with warnings.catch_warnings():  # the frozen backbone is in eval mode on purpose (LinearProbe.train)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        trainer.fit(module, train_loader, val_loader)
    module.history.num_train = len(splits["train"]) - module.history.unreadable["train"]
    job["record"]["unreadable"] = {s: module.history.unreadable[s] for s in ("train", "val")} | {
        "files": [module.unreadable[s].index[i] for s in ("train", "val") for i in sorted(module.unreadable[s].index)][:20]
    }  # rank 0's names; the counts are over all ranks
    return history_as_dict(module.history) if trainer.is_global_zero else None


def _run_linear_fast(cfg: Namespace, job: dict[str, Any]) -> dict[str, Any] | None:
    """Fast variant: the same optimiser on cached eval features (shared with the k-NN cache)."""
    from .linear import history_as_dict, sweep_linear_on_features, train_linear_on_features  # noqa: PLC0415

    feats = {}
    for split in ("train", "val"):
        fs, _, _ = _features(cfg, split, job["splits"][split], job["model"], job["transform"],
                             job["key_parts"], job["cache"])  # fmt: skip
        if fs is None:
            return None
        feats[split] = fs
    lin = cfg.linear
    common = {"epochs": lin.epochs, "batch_size": lin.batch_size, "momentum": lin.momentum,
              "weight_decay": lin.weight_decay, "device": _compute_device(cfg), "seed": cfg.data.seed,
              "on_epoch": lambda e, t1, t5: log.info("linear_fast epoch %d: top-1 %.2f top-5 %.2f", e, t1, t5)}  # fmt: skip
    args = (feats["train"].features, feats["train"].labels, feats["val"].features, feats["val"].labels)
    if lin.lr_sweep:
        _, history, sweep = sweep_linear_on_features(
            *args, base_lrs=lin.lr_sweep, holdout=lin.sweep_holdout,
            on_candidate=lambda lr, t1: log.info("linear_fast lr sweep: base_lr %g, held-out top-1 %.2f", lr, t1),
            **common,
        )  # fmt: skip
        log.info("linear_fast: base_lr %g chosen on %d held-out training images", sweep["chosen_base_lr"],
                 sweep["holdout_images"])  # fmt: skip
        job["record"]["lr_sweep"] = sweep
    else:
        _, history = train_linear_on_features(*args, base_lr=lin.base_lr, **common)
    job["record"]["unreadable"] = unreadable_record(job["splits"], {s: feats[s].unreadable for s in feats})
    history.unreadable = {s: int(len(feats[s].unreadable)) for s in feats}
    return history_as_dict(history)


def _num_classes(splits: dict[str, Any]) -> int:
    labels = getattr(splits["train"], "targets", None)
    if labels is None:  # generic dataset: read the labels (decodes images once; small sets only)
        labels = [splits["train"][i][1] for i in range(len(splits["train"]))]
    return int(max(int(y) for y in labels)) + 1


# -- commands ------------------------------------------------------------------------------------


def knn_main(argv: list[str]) -> int:
    """``xcit-ssl knn``: weighted k-NN top-1/top-5 for every k of the protocol. Returns 0."""
    cfg, protocol = _parse("knn", argv)
    if any(k < 1 for k in cfg.knn.ks) or not cfg.knn.ks:
        raise UserError(f"knn.ks={cfg.knn.ks}: give positive integers, e.g. [10, 20, 100, 200]")
    job = _prepare("knn", cfg, protocol)
    feats, timings = {}, {}
    for split in ("train", "val"):
        fs, hit, seconds = _features(cfg, split, job["splits"][split], job["model"], job["transform"],
                                     job["key_parts"], job["cache"])  # fmt: skip
        if fs is None:  # a non-zero DDP rank: rank 0 evaluates and writes
            return 0
        feats[split] = fs
        timings[f"{split}_features_seconds"] = round(seconds, 2)
        timings[f"{split}_cache_hit"] = hit
    device = _compute_device(cfg)
    result = knn_evaluate(feats["train"].features, feats["train"].labels, feats["val"].features,
                          feats["val"].labels, ks=cfg.knn.ks, temperature=cfg.knn.temperature,
                          backend=cfg.knn.backend, device=device)  # fmt: skip
    record = job["record"]
    record["protocol_config"]["knn"] = asdict(KNNConfig(**vars(cfg.knn)))
    record.update(result.as_dict())
    record["unreadable"] = unreadable_record(job["splits"], {s: feats[s].unreadable for s in feats})
    record["timing"] = timings
    write_json_atomic(job["out"], record)
    rows = [[str(k), f"{result.k_used[k]}", f"{result.top1[k]:.2f}", f"{result.top5[k]:.2f}"] for k in cfg.knn.ks]
    _print_table(f"k-NN ({protocol}, T={cfg.knn.temperature})", ["k", "k used", "top-1 %", "top-5 %"], rows,
                 f"weights {job['source'].name} (sha256 {record['weights']['sha256'][:12]}), "
                 f"{evaluated_note(result.num_train, result.num_test, record['unreadable'])}, "
                 f"{result.num_classes} classes, {result.backend} search\nresult: {job['out']}")  # fmt: skip
    return 0


def linear_main(argv: list[str]) -> int:
    """``xcit-ssl linear``: DINO linear probe (or ``--linear.fast true`` on cached features)."""
    cfg, protocol = _parse("linear", argv)
    lin = cfg.linear
    if lin.epochs < 1 or lin.batch_size < 1:
        raise UserError(f"linear.epochs={lin.epochs} and linear.batch_size={lin.batch_size} must be >= 1")
    if lin.lr_sweep and (min(lin.lr_sweep) <= 0 or not 0.0 < lin.sweep_holdout < 1.0):
        raise UserError(f"linear.lr_sweep={lin.lr_sweep} needs positive learning rates and linear.sweep_holdout="
                        f"{lin.sweep_holdout} a fraction in (0, 1): e.g. --linear.lr_sweep '[0.01, 0.1, 1.0]' "
                        f"--linear.sweep_holdout 0.1")  # fmt: skip
    if lin.lr_sweep and not lin.fast:
        log.info("linear: the lr sweep applies to --linear.fast true; this probe trains with base_lr %g", lin.base_lr)
    job = _prepare("linear", cfg, protocol)
    variant = "linear_fast" if lin.fast else "linear"
    if lin.fast and not cfg.out:
        job["out"] = job["out"].with_name(job["out"].name.replace(protocol, f"{protocol}_fast", 1))
    start = time.perf_counter()
    summary = (_run_linear_fast if lin.fast else _run_linear_probe)(cfg, job)
    if summary is None:  # a non-zero DDP rank
        return 0
    record = job["record"]
    record["variant"] = variant
    if lin.fast:
        record["variant_note"] = "fast variant: cached eval-transform features, no augmentation; not the DINO protocol"
    record["protocol_config"]["linear"] = asdict(LinearConfig(**vars(lin)))
    record["results"] = summary
    record["timing"] = {"total_seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(job["out"], record)
    rows = [["best", f"{summary['best_top1']:.2f}", f"{summary['best_top5']:.2f}", str(summary["best_epoch"])],
            ["last", f"{summary['last_top1']:.2f}", f"{summary['last_top5']:.2f}", str(summary["epochs_evaluated"])]]
    lr_note = (f", base_lr {record['lr_sweep']['chosen_base_lr']:g} from the sweep" if "lr_sweep" in record
               else f", base_lr {lin.base_lr:g}")  # fmt: skip
    _print_table(f"{variant} ({protocol}, {lin.epochs} epochs{lr_note})", ["", "top-1 %", "top-5 %", "epoch"], rows,
                 f"weights {job['source'].name} (sha256 {record['weights']['sha256'][:12]}), "
                 f"{evaluated_note(summary['num_train'], summary['num_val'], record.get('unreadable', {}))}\n"
                 f"result: {job['out']}")  # fmt: skip
    return 0
