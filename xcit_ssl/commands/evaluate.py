"""``xcit-ssl knn`` and ``xcit-ssl linear``: parse, load the backbone, extract (cached), evaluate,
print a table, write a JSON result.

Both take a protocol (``--protocol knn_fmnist``, a name from ``eval/`` or a YAML path) whose
values any flag can override (``--data.root``, ``--knn.ks [20]``, ``--linear.epochs 10``), and
the weights as ``--checkpoint PATH`` (a training checkpoint, teacher by default) or
``--weights PATH [--backbone NAME]`` (an exported backbone or a timm / official / DINO /
mmpretrain file). Mistakes a user can make raise :class:`~xcit_ssl.errors.UserError`.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from .weights_flags import add_weights_arguments, weights_from_flags

from .. import __version__
from ..config import protocol_path
from ..console import adopt_library_loggers, print_table
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..devices import lightning_accelerator, torch_device
from ..errors import UserError
from ..files import check_writable, run_dir_of, sha256_file, write_json
from ..evaluation.features import (
    CLSFeatures,
    FeatureCache,
    FeatureSet,
    RawPixels,
    cached_features,
    extract_features,
    quiet_lightning_info,
)
from ..evaluation.eval_data import check_classes, count_classes, evaluated_note, open_splits, resolved_root, unreadable_record
from ..evaluation.knn import knn_evaluate
from ..evaluation.result_index import index_result
from ..evaluation.tables import KNN_HEADERS, LINEAR_HEADERS, knn_notes, knn_rows, linear_notes, linear_rows
from ..evaluation.weights import load_feature_model
from ..evaluation.protocol import DataConfig, FeatureConfig, KNNConfig, LinearConfig, transform_description

log = logging.getLogger(__name__)


# -- parsing -------------------------------------------------------------------------------------


_DESCRIPTIONS = {
    "knn": "Weighted k-NN accuracy (DINO protocol: cosine, exp(sim/0.07) votes, k = 10/20/100/200) of a "
    "backbone's frozen CLS features. Values come from --protocol; any flag overrides them.",
    "linear": "Linear-probe accuracy (DINO protocol: frozen backbone, SGD, cosine, RandomResizedCrop + flip; "
    "--linear.fast true: cached features, no augmentation). Values come from --protocol; flags override them.",
}


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
    path = protocol_path(protocol)
    cfg = parser.parse_args(["--protocol", str(path), *argv])
    return cfg, path.stem


# -- shared steps --------------------------------------------------------------------------------


def _mean_std(cfg: Namespace, spec: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Protocol values, or (when null) the checkpoint's training statistics, else ImageNet's."""
    mean = cfg.features.mean or spec.get("mean") or list(IMAGENET_MEAN)
    std = cfg.features.std or spec.get("std") or list(IMAGENET_STD)
    return [float(m) for m in mean], [float(s) for s in std]


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
                                 lightning_accelerator(cfg.device), cfg.devices, cfg.precision, cfg.progress),
    )  # fmt: skip
    return result, hit, time.perf_counter() - start


def _prepare(command: str, cfg: Namespace, protocol: str) -> dict[str, Any]:
    """Everything both commands share: weights, hash, model, transform, splits, cache, out path."""
    adopt_library_loggers()  # Lightning (imported with evaluation.features) logs through our handler, once
    if cfg.raw_pixels:
        if cfg.checkpoint or cfg.weights or cfg.random_init:
            raise UserError("--raw_pixels evaluates the images themselves: drop --checkpoint/--weights/--random_init")
        source = Path("runs") / "raw_pixels" / "pixels"
        run_dir = source.parent
    else:
        source = weights_from_flags(cfg)
        run_dir = run_dir_of(source)
    stem = protocol if protocol.startswith(command) else f"{command}_{protocol}"
    if not cfg.out:  # the default name tells apart what a run folder evaluates: weights, network, feature
        parts = [stem, source.stem]
        if not cfg.raw_pixels and cfg.checkpoint_key != "teacher":
            parts.append(cfg.checkpoint_key)
        if not cfg.raw_pixels and cfg.features.pooling != "cls":
            parts.append(cfg.features.pooling)
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / "eval" / ("_".join(parts) + ".json")
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else run_dir / "eval" / "feature_cache"
    # before any work: a read-only run folder (the default place of both) fails now, not after the features
    check_writable(out.parent, "--out", out)
    if not cfg.no_cache:
        check_writable(cache_dir, "--cache_dir")
    splits = open_splits(cfg.data)  # before the weights: a data set that cannot be evaluated fails at once
    num_classes = check_classes(command, splits["train"], cfg.data)
    cache = None if cfg.no_cache else FeatureCache(cache_dir)
    if cfg.raw_pixels:
        sha = "raw_pixels"
        model: Any = RawPixels()
        info = {"backbone": "raw_pixels", "embed_dim": 3 * cfg.features.crop_size**2, "patch_size": 1, "spec": {}}
    else:
        sha = sha256_file(source, None if cfg.no_cache else cache_dir / "sha256_index.json")
        model, info = load_feature_model(source, cfg.checkpoint_key, cfg.backbone, cfg.features.pooling,
                                         cfg.features.crop_size)
    mean, std = _mean_std(cfg, info["spec"])
    from ..evaluation.protocol import build_feature_transform  # noqa: PLC0415

    f = cfg.features
    transform = build_feature_transform(f.resize_size, f.crop_size, mean, std, f.interpolation)
    key_parts = {"weights_sha256": sha, "checkpoint_key": cfg.checkpoint_key, "backbone": info["backbone"],
                 "transform": transform_description(f, mean, std)}  # fmt: skip
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
        "data": {"dataset": cfg.data.dataset, "root": resolved_root(cfg.data), "train_split": cfg.data.train_split,
                 "val_split": cfg.data.val_split, "n_train": cfg.data.n_train, "n_val": cfg.data.n_val},
    }  # fmt: skip
    return {"source": source, "cache": cache, "model": model, "info": info, "transform": transform,
            "splits": splits, "key_parts": key_parts, "out": out, "record": record}  # fmt: skip


def _run_linear_probe(cfg: Namespace, job: dict[str, Any]) -> dict[str, Any] | None:
    """The protocol: augmented images through the frozen backbone, Lightning ``fit``."""
    import lightning.pytorch as pl  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from ..evaluation.features import TransformedDataset, collate_readable  # noqa: PLC0415
    from ..evaluation.linear import LinearProbe, build_linear_train_transform, history_as_dict  # noqa: PLC0415

    lin, f, splits = cfg.linear, cfg.features, job["splits"]
    stats = job["record"]["protocol_config"]["features"]
    with quiet_lightning_info():
        trainer = pl.Trainer(
            accelerator=lightning_accelerator(cfg.device), devices=cfg.devices, precision=cfg.precision,
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
    module = LinearProbe(job["model"], job["info"]["embed_dim"], splits["num_classes"] or count_classes(splits["train"]),
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
    from ..evaluation.linear import history_as_dict, sweep_linear_on_features, train_linear_on_features  # noqa: PLC0415

    feats = {}
    for split in ("train", "val"):
        fs, _, _ = _features(cfg, split, job["splits"][split], job["model"], job["transform"],
                             job["key_parts"], job["cache"])  # fmt: skip
        if fs is None:
            return None
        feats[split] = fs
    lin = cfg.linear
    common = {"epochs": lin.epochs, "batch_size": lin.batch_size, "momentum": lin.momentum,
              "weight_decay": lin.weight_decay, "device": str(torch_device(cfg.device)), "seed": cfg.data.seed,
              "on_epoch": lambda e, t1, t5: log.info("linear_fast epoch %d: top-1 %.2f", e, t1)}  # fmt: skip
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
    device = str(torch_device(cfg.device))
    result = knn_evaluate(feats["train"].features, feats["train"].labels, feats["val"].features,
                          feats["val"].labels, ks=cfg.knn.ks, temperature=cfg.knn.temperature,
                          backend=cfg.knn.backend, device=device)  # fmt: skip
    record = job["record"]
    record["protocol_config"]["knn"] = asdict(KNNConfig(**vars(cfg.knn)))
    record.update(result.as_dict())
    record["unreadable"] = unreadable_record(job["splits"], {s: feats[s].unreadable for s in feats})
    record["timing"] = timings
    write_json(job["out"], record)
    index_result(run_dir_of(job["source"]), job["out"], record)  # --out elsewhere: export still finds it
    notes = "".join(f"\n{note}" for note in knn_notes(result))
    print_table(f"k-NN ({protocol}, T={cfg.knn.temperature})", KNN_HEADERS, knn_rows(result),
                footer=f"weights {job['source'].name} (sha256 {record['weights']['sha256'][:12]}), "
                       f"{evaluated_note(result.num_train, result.num_test, record['unreadable'])}, "
                       f"{result.num_classes} classes, {result.backend} search{notes}\nresult: {job['out']}")  # fmt: skip
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
    write_json(job["out"], record)
    index_result(run_dir_of(job["source"]), job["out"], record)
    notes = "".join(f"\n{note}" for note in linear_notes(summary))
    lr_note = (f", base_lr {record['lr_sweep']['chosen_base_lr']:g} from the sweep" if "lr_sweep" in record
               else f", base_lr {lin.base_lr:g}")  # fmt: skip
    print_table(f"{variant} ({protocol}, {lin.epochs} epochs{lr_note})", LINEAR_HEADERS, linear_rows(summary),
                footer=f"weights {job['source'].name} (sha256 {record['weights']['sha256'][:12]}), "
                       f"{evaluated_note(summary['num_train'], summary['num_val'], record.get('unreadable', {}))}"
                       f"{notes}\nresult: {job['out']}")  # fmt: skip
    return 0
