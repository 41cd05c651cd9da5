"""``build_backbone``: the typed builder recipes name (``xcit_ssl.models.build_backbone``).

It sits above both the registry (which builds the network) and the checkpoint loader (which
fills it with ``pretrained`` weights and itself needs the registry), so neither imports the other
back. The class path recipes and saved ``config.yaml`` files use is the re-export in
``xcit_ssl/models/__init__.py``; keep it.
"""

from __future__ import annotations

import logging
from typing import Any

from .checkpoints import load_backbone_weights
from .registry import create_backbone
from .xcit import XCiT

logger = logging.getLogger(__name__)


def build_backbone(
    name: str = "xcit_small_12_p16_224",
    drop_path_rate: float = 0.0,
    num_classes: int = 0,
    pretrained: str | None = None,
    checkpoint_key: str = "teacher",
    img_size: int | None = None,
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
) -> XCiT:
    """Typed builder used by recipes (``backbone: {class_path: xcit_ssl.models.build_backbone}``).

    Args:
        name: a timm variant name (``xcit-ssl models`` lists them).
        drop_path_rate: stochastic depth, the same in every XCA block.
        num_classes: 0 for a headless backbone (DINO, evaluation), else a classifier head.
        pretrained: optional weights in any scheme the loader reads (timm, official, DINO,
            mmpretrain, our checkpoints and exports); loaded strictly, the head dropped when its
            shape differs.
        checkpoint_key: which network of a two-network checkpoint to take (``teacher``/``student``).
        img_size: nominal training resolution (any resolution runs; this is metadata).
        depth, embed_dim, num_heads: overrides for tiny test models.
    """
    overrides: dict[str, Any] = {"drop_path_rate": drop_path_rate, "num_classes": num_classes}
    for key, value in (("img_size", img_size), ("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if value is not None:
            overrides[key] = value
    model = create_backbone(name, **overrides)
    if pretrained:
        report = load_backbone_weights(model, pretrained, checkpoint_key=checkpoint_key)
        logger.info("loaded pretrained weights from %s: %s", pretrained, report)
    return model
