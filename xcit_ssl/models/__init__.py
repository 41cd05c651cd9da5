"""The XCiT backbone family, its registry, heads and checkpoint readers."""

from .registry import VARIANTS, build_backbone, create_backbone, list_backbones, variant_args
from .xcit import XCiT, XCiTFeatures

__all__ = ["VARIANTS", "build_backbone", "XCiT", "XCiTFeatures", "create_backbone", "list_backbones", "variant_args"]
