"""Named XCiT variants (timm's names) and :func:`create_backbone`.

:func:`~.build.build_backbone`, the recipes' builder that may also load weights, lives in
:mod:`.build`, above the checkpoint loader (which itself needs :func:`create_backbone`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .xcit import XCiT


@dataclass(frozen=True)
class Family:
    embed_dim: int
    depth: int
    num_heads: int
    eta: float
    tokens_norm: bool


# REFERENCE.md section 1: D, depth, heads, layer-scale init (eta), tokens_norm
FAMILIES: dict[str, Family] = {
    "nano_12": Family(128, 12, 4, 1.0, False),
    "tiny_12": Family(192, 12, 4, 1.0, True),
    "tiny_24": Family(192, 24, 4, 1e-5, True),
    "small_12": Family(384, 12, 8, 1.0, True),
    "small_24": Family(384, 24, 8, 1e-5, True),
    "medium_24": Family(512, 24, 8, 1e-5, True),
    "large_24": Family(768, 24, 16, 1e-5, True),
}
PATCH_SIZES = (16, 8)
IMG_SIZES = (224, 384)


def _variant_args(family: Family, patch_size: int, img_size: int) -> dict[str, Any]:
    return dict(
        img_size=img_size, patch_size=patch_size, embed_dim=family.embed_dim, depth=family.depth,
        num_heads=family.num_heads, eta=family.eta, tokens_norm=family.tokens_norm,
    )  # fmt: skip


VARIANTS: dict[str, dict[str, Any]] = {
    f"xcit_{fam}_p{p}_{s}": _variant_args(family, p, s)
    for fam, family in FAMILIES.items()
    for p in PATCH_SIZES
    for s in IMG_SIZES
}


def list_backbones(pattern: str = "") -> list[str]:
    """Names of every variant containing ``pattern`` (e.g. ``"small"``, ``"p8_384"``)."""
    return sorted(name for name in VARIANTS if pattern in name)


class UnknownBackboneError(UserError, ValueError):
    pass


def variant_args(name: str) -> dict[str, Any]:
    """Constructor arguments of a named variant; an unknown name raises with the closest ones."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownBackboneError(
            f"unknown backbone '{name}': {hint}valid names are xcit_<size>_<depth>_p<8|16>_<224|384> "
            f"(run `xcit-ssl models` for all {len(VARIANTS)})"
        )
    return dict(VARIANTS[name])


def create_backbone(name: str, **overrides: Any) -> XCiT:
    """Build a named variant, e.g. ``create_backbone("xcit_small_12_p16_224", drop_path_rate=0.05)``.

    ``overrides`` are :class:`XCiT` constructor arguments (``num_classes``, ``drop_path_rate``,
    and ``depth``/``embed_dim``/``num_heads`` for tiny test models). ``num_classes`` defaults to
    1000 as in timm; pass 0 for a headless backbone.
    """
    args = variant_args(name)
    if "patch_size" in overrides and overrides["patch_size"] not in PATCH_SIZES:
        raise UserError(f"unsupported patch_size {overrides['patch_size']}: XCiT has patch sizes 8 and 16")
    args.update(overrides)
    model = XCiT(**args)
    model.variant_name = name  # type: ignore[assignment]
    model.build_args = dict(overrides)  # type: ignore[assignment]
    return model

