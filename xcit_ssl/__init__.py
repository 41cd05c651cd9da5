"""xcit-ssl: self-supervised pretraining of XCiT vision transformers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "create_backbone", "load_backbone"]


def __getattr__(name: str) -> Any:
    # lazy, so that `import xcit_ssl` stays light: torch is imported on first use only
    if name == "create_backbone":
        from .models.registry import create_backbone

        return create_backbone
    if name == "load_backbone":
        from .models.checkpoints import load_backbone

        return load_backbone
    raise AttributeError(f"module 'xcit_ssl' has no attribute {name!r}")
