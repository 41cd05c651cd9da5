"""The weight flags of ``knn``, ``linear`` and ``attention``: one set, one reading."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser, Namespace

from ..evaluation.weights import resolve_weights


def add_weights_arguments(parser: ArgumentParser, random_init_help: str | None = None) -> None:
    """``--checkpoint`` / ``--weights`` / ``--backbone`` (and ``--random_init`` when the command
    can run on a fresh network: ``random_init_help``): where a command's weights come from (read
    by :func:`weights_from_flags`)."""
    parser.add_argument("--checkpoint", type=Optional[str], default=None,
                        help="training checkpoint (*.ckpt) or exported backbone (*.safetensors)")
    parser.add_argument("--weights", type=Optional[str], default=None,
                        help="a backbone weight file (timm / official XCiT / DINO / mmpretrain / exported)")
    parser.add_argument("--backbone", type=Optional[str], default=None,
                        help="timm variant name for --weights files that do not record it, e.g. xcit_small_12_p16_224")
    if random_init_help is not None:
        parser.add_argument("--random_init", type=Optional[str], default=None, help=random_init_help)


def weights_from_flags(cfg: Namespace) -> Path:
    """The weights file the flags name; a random initialisation sets ``cfg.backbone`` to its variant."""
    path, name = resolve_weights(cfg.checkpoint, cfg.weights, cfg.random_init)
    if name is not None:
        cfg.backbone = name
    return path
