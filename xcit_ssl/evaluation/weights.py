"""Which weights an evaluation or analysis runs on, and the frozen feature model built from them.

A command names its weights as a training checkpoint, a weight file (+ variant name), a random
initialisation of a variant or of a checkpoint's architecture, or the raw pixels; this module
turns that choice into a file on disk (:func:`resolve_weights`) and a model (:func:`load_feature_model`).
Random initialisations are written once, seed 0, as a safetensors file recording their variant:
the same file and hash every time, so their features are cached like any other weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_path
from ..models.record import arch_overrides
from .features import POOLING_PYRAMID, POOLING_WIDTH, CLSFeatures

def random_init_weights(name: str, overrides: dict[str, Any] | None = None,
                        folder: Path = Path("runs") / "random_init") -> Path:  # fmt: skip
    """A seed-0 random initialisation of ``name`` (with architecture ``overrides``, e.g. a recipe's
    fewer blocks) as a safetensors file recording its variant: same file, same hash, every time."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from ..models import create_backbone  # noqa: PLC0415

    overrides = arch_overrides(overrides or {})
    tag = "".join(f"_{k}{v}" for k, v in sorted(overrides.items()))
    path = folder / f"{name}{tag}_seed0.safetensors"
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_backbone(name, num_classes=0, **overrides)
        metadata = {"xcit_ssl": json.dumps({"name": name, "overrides": overrides})}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    return path


def random_init_source(value: str) -> tuple[str, dict[str, Any]]:
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


def resolve_weights(checkpoint: str | None, weights: str | None, random_init: str | None) -> tuple[Path, str | None]:
    """The weights file the flags ``--checkpoint`` / ``--weights`` / ``--random_init`` name, and
    the variant name when a random initialisation fixes it (else None: the file or ``--backbone`` says)."""
    if random_init:
        if checkpoint or weights:
            raise UserError("--random_init evaluates a fresh backbone: drop --checkpoint/--weights")
        name, overrides = random_init_source(random_init)
        return random_init_weights(name, overrides), name
    if checkpoint and weights:
        raise UserError("pass either --checkpoint or --weights, not both")
    source = checkpoint or weights
    if not source:
        raise UserError("no weights given: pass --checkpoint PATH (a training checkpoint or exported "
                        "backbone) or --weights PATH --backbone NAME")  # fmt: skip
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    return path, None


def training_stats(source: Path) -> dict[str, Any]:
    """``mean``/``std``/``img_size`` an xcit-ssl checkpoint or export records (empty otherwise)."""
    from ..models.record import read_record  # noqa: PLC0415

    record = read_record(source)  # memory-mapped: cheap even for big checkpoints
    if record is None:
        return {}
    found = {"mean": record.mean and list(record.mean), "std": record.std and list(record.std), "img_size": record.img_size}
    return {k: v for k, v in found.items() if v is not None}


def load_feature_model(source: Path, checkpoint_key: str, backbone: str | None, pooling: str,
                       crop_size: int) -> tuple[CLSFeatures, dict[str, Any]]:  # fmt: skip
    """The frozen feature model ``images [B, 3, H, W] -> [B, D]`` of ``source`` and what it is:
    ``backbone`` (variant), ``embed_dim`` (D: the pooled width), ``patch_size``, ``spec`` (the
    training statistics the file records). Crop sizes the pooling cannot use raise UserError."""
    from ..models.checkpoints import load_backbone  # noqa: PLC0415

    model = load_backbone(str(source), checkpoint_key=checkpoint_key, name=backbone, num_classes=0)
    spec = training_stats(source)
    if crop_size % model.patch_size:
        raise UserError(f"features.crop_size={crop_size} is not a multiple of the backbone's "
                        f"patch size {model.patch_size}: pick a multiple (e.g. 224 or 32)")  # fmt: skip
    side = max(POOLING_PYRAMID.get(pooling, (0,)))
    if side and crop_size < side * model.patch_size:
        raise UserError(f"features.pooling={pooling} needs at least a {side}x{side} patch grid: pass "
                        f"--features.crop_size {side * model.patch_size} or more, or --features.pooling "
                        f"{'cls+pyramid' if side > 2 else 'cls+mean_patch'}")  # fmt: skip
    info = {"backbone": getattr(model, "variant_name", backbone), "embed_dim": model.embed_dim * POOLING_WIDTH[pooling],
            "patch_size": model.patch_size, "spec": spec}  # fmt: skip
    return CLSFeatures(model, pooling), info
